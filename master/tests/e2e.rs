//! End to end: the real `rbb master` and `rbb-worker` binaries on loopback, real git
//! repositories, a real redb file. Faults included: wrong tokens, killed and frozen workers,
//! a killed master, garbage on the gRPC port, huge and binary output.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(60);

struct Setup {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    state: std::path::PathBuf,
}

fn setup(pipeline: &str, workers: &[(&str, &str, &[&str])]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), pipeline, &[("README.md", "the app readme\n")]);
    let config = write_config(dir.path(), &["app"], workers);
    let state = dir.path().join("state");
    Setup { dir, config, state }
}

fn step<'a>(build: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    build["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {build}"))
}

fn log_of(m: &Master, build: &serde_json::Value, name: &str) -> String {
    let id = step(build, name)["log_id"].as_u64().expect("log id");
    m.get(&format!("/api/v2/logs/{id}/raw")).text()
}

const FLAGS: &str = r#"
builders:
  build:
    labels: [linux]
    steps:
      - name: hello
        run: echo "hello from $RBB_BUILDER at $RBB_COMMIT"; cat README.md
      - name: lint
        run: echo lint problems >&2; exit 3
        halt_on_failure: false
        flunk_on_failure: false
        warn_on_failure: true
      - name: release-only
        run: echo never
        if: "branch == 'release'"
      - name: fail
        run: exit 7
      - name: after-halt
        run: echo not run
      - name: cleanup
        run: echo cleaning up
        always_run: true
"#;

#[test]
fn a_forced_build_runs_with_buildbot_step_semantics() {
    let s = setup(FLAGS, &[("w1", "secret", &["linux"])]);
    let m = Master::start(&s.config, &s.state);
    let _w = Worker::start(&m, "w1", "secret", &s.dir.path().join("w1"), &[]);
    let start = Instant::now();
    let id = m.force("app/build");
    let b = m.finished(id, T);
    eprintln!("build finished in {:?}", start.elapsed());
    assert_eq!(b["result"], "FAILURE", "{b:#}");
    assert_eq!(b["worker"], "w1");
    let results: Vec<(&str, &str)> = b["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].as_str().expect("name"), s["result"].as_str().expect("result")))
        .collect();
    assert_eq!(
        results,
        [
            ("hello", "SUCCESS"),
            ("lint", "FAILURE"),
            ("release-only", "SKIPPED"),
            ("fail", "FAILURE"),
            ("after-halt", "SKIPPED"),
            ("cleanup", "SUCCESS")
        ]
    );
    assert_eq!(step(&b, "fail")["exit_code"], 7);
    assert!(step(&b, "release-only")["reason"].as_str().expect("reason").contains("is false"));
    assert!(b["result_reason"].as_str().expect("reason").contains("fail"), "{b:#}");
    // The build pins the plan and the pipeline blob it ran.
    let plan = m.get("/api/v2/plan").json();
    assert_eq!(b["plan_hash"], plan["hash"]);
    assert_eq!(b["pipeline_blob"], plan["repos"][0]["pipeline_blob"]);

    let hello = log_of(&m, &b, "hello");
    assert!(hello.contains(&format!("hello from app/build at {}", b["commit"].as_str().expect("commit"))), "{hello}");
    assert!(hello.contains("the app readme"), "{hello}");
    assert!(log_of(&m, &b, "lint").contains("lint problems"));
    assert!(log_of(&m, &b, "cleanup").contains("cleaning up"));

    // Byte ranges.
    let log = step(&b, "hello")["log_id"].as_u64().expect("log");
    let full = m.get(&format!("/api/v2/logs/{log}/raw")).body;
    let part = support::http(&m.http, "GET", &format!("/api/v2/logs/{log}/raw"), &[("Range", "bytes=2-9")], None);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, full[2..10]);
    assert_eq!(part.header("content-range"), Some(format!("bytes 2-9/{}", full.len()).as_str()));
    let tail = support::http(&m.http, "GET", &format!("/api/v2/logs/{log}/raw"), &[("Range", "bytes=-5")], None);
    assert_eq!(tail.body, full[full.len() - 5..]);
    let q = m.get(&format!("/api/v2/logs/{log}/raw?offset=1&limit=3"));
    assert_eq!(q.body, full[1..4]);

    // Listings.
    let builds = m.get("/api/v2/builds?builder=app%2Fbuild").json();
    assert_eq!(builds["meta"]["total"], 1);
    let steps = m.get(&format!("/api/v2/builds/{id}/steps")).json();
    assert_eq!(steps["meta"]["total"], 6);
    let builders = m.get("/api/v2/builders").json();
    assert_eq!(builders["builders"][0]["last_build"]["result"], "FAILURE");
    let workers = m.get("/api/v2/workers").json();
    assert_eq!(workers["workers"][0]["connected"], true);
}

#[test]
fn needs_run_first_and_a_failed_need_skips_the_dependent() {
    let pipeline = r#"
builders:
  compile:
    steps: [{ run: "echo compiled > ../compiled.txt; sleep 0.2" }]
  test:
    needs: compile
    steps: [{ run: echo tested }]
  broken:
    steps: [{ run: exit 1 }]
  after-broken:
    needs: broken
    steps: [{ run: echo never }]
"#;
    let s = setup(pipeline, &[("w1", "t", &[])]);
    let m = Master::start(&s.config, &s.state);
    let _w = Worker::start(&m, "w1", "t", &s.dir.path().join("w1"), &[]);
    let r = m.post(&format!("/api/v2/builders/{}/force", encode("app/test")), "{}");
    assert_eq!(r.status, 201, "{}", r.text());
    let (test, needed) = (r.json()["build"].as_u64().expect("id"), r.json()["needed"].clone());
    assert_eq!(needed.as_array().expect("needed").len(), 1);
    let compile = m.finished(needed[0].as_u64().expect("id"), T);
    let t = m.finished(test, T);
    assert_eq!(compile["result"], "SUCCESS");
    assert_eq!(t["result"], "SUCCESS");
    assert_eq!(t["waits_for"][0], compile["id"]);
    assert!(t["started_at"].as_u64() >= compile["finished_at"].as_u64(), "test started before compile finished");

    let after = m.force("app/after-broken");
    let a = m.finished(after, T);
    assert_eq!(a["result"], "SKIPPED", "{a:#}");
    assert!(a["result_reason"].as_str().expect("reason").contains("app/broken"), "{a:#}");
}

#[test]
fn a_wrong_token_is_refused_and_logged_on_both_sides() {
    let s = setup(FLAGS, &[("w1", "right", &["linux"])]);
    let m = Master::start(&s.config, &s.state);
    let mut w = Worker::start(&m, "w1", "wrong", &s.dir.path().join("w1"), &[]);
    let status = wait_for(T, "the refused worker to exit", || w.child.try_wait().expect("wait"));
    assert_eq!(status.code(), Some(2));
    assert!(w.log_text().contains("wrong token for worker `w1`"), "{}", w.log_text());
    assert!(m.log_text().contains("refused a worker with a wrong token"), "{}", m.log_text());
    let mut u = Worker::start(&m, "nobody", "right", &s.dir.path().join("w2"), &[]);
    let status = wait_for(T, "the unknown worker to exit", || u.child.try_wait().expect("wait"));
    assert_eq!(status.code(), Some(2));
    assert!(u.log_text().contains("no worker named `nobody`"), "{}", u.log_text());
    assert_eq!(m.get("/api/v2/workers").json()["workers"][0]["connected"], false);
}

#[test]
fn bad_requests_get_clear_errors() {
    let s = setup(FLAGS, &[("w1", "t", &["linux"])]);
    let m = Master::start(&s.config, &s.state);
    let r = m.post(&format!("/api/v2/builders/{}/force", encode("app/buidl")), "{}");
    assert_eq!(r.status, 404);
    let e = r.json();
    assert_eq!(e["error"]["code"], "not_found");
    assert!(e["error"]["message"].as_str().expect("msg").contains("did you mean app/build"), "{e}");
    let r = m.post(&format!("/api/v2/builders/{}/force", encode("app/build")), r#"{"revision": "nope"}"#);
    assert_eq!(r.status, 404, "an unknown revision is not found: {}", r.text());
    let r = m.post(&format!("/api/v2/builders/{}/force", encode("app/build")), r#"{"colour": "red"}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().expect("msg").contains("unknown field `colour`"));
    assert_eq!(m.get("/api/v2/builds/abc").status, 400);
    assert_eq!(m.get("/api/v2/builds/999").status, 404);
    assert_eq!(m.get("/api/v2/logs/999/raw").status, 404);
    assert_eq!(m.get("/api/v2/nothing").json()["error"]["code"], "not_found");
    assert_eq!(m.get("/api/v2/builds?limit=100000").status, 400);
}

#[test]
fn stopping_a_build_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("bg.pid");
    let pipeline = format!(
        "builders:\n  slow:\n    steps:\n      - run: 'echo started; sleep 60 & echo $! > {}; wait'\n      - run: echo after\n        always_run: true\n",
        pidfile.display()
    );
    make_repo(&dir.path().join("app"), &pipeline, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let id = m.force("app/slow");
    let pid: i32 = wait_for(T, "the step to start", || std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok());
    // The log is readable while the step still runs.
    let log = m.build(id)["steps"][0]["log_id"].as_u64().expect("log id");
    wait_for(T, "the running step's output in its log", || {
        m.get(&format!("/api/v2/logs/{log}/raw")).text().contains("started").then_some(())
    });
    assert_eq!(m.build(id)["state"], "running");
    assert_eq!(m.get(&format!("/api/v2/logs/{log}")).json()["complete"], false);
    let w = m.get("/api/v2/workers").json();
    assert_eq!(w["workers"][0]["current"][0]["build"], id, "{w}");
    assert_eq!(w["workers"][0]["current"][0]["name"], "step-1");
    let r = m.post(&format!("/api/v2/builds/{id}/stop"), "");
    assert_eq!(r.status, 202, "{}", r.text());
    let b = m.finished(id, Duration::from_secs(20));
    assert_eq!(b["result"], "CANCELLED", "{b:#}");
    assert_eq!(b["steps"][0]["result"], "CANCELLED");
    assert_eq!(b["steps"][1]["result"], "SKIPPED", "a stopped build runs nothing more");
    wait_for(Duration::from_secs(10), "the background sleep to be killed", || {
        // SAFETY: signal 0 only checks whether the process exists.
        (unsafe { libc_kill(pid, 0) } != 0).then_some(())
    });
    assert_eq!(m.post(&format!("/api/v2/builds/{id}/stop"), "").status, 409);
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

const SLOW_ON_W1: &str = r#"
builders:
  build:
    labels: [linux]
    steps:
      - run: 'if [ -n "$SLOW" ]; then echo slow; sleep 60; fi; echo done on $HOSTNAME_TAG'
"#;

#[test]
fn a_killed_worker_loses_its_step_to_another_worker() {
    let s = setup(SLOW_ON_W1, &[("w1", "t", &["linux"]), ("w2", "t", &["linux"])]);
    let m = Master::start(&s.config, &s.state);
    let mut w1 = Worker::start(&m, "w1", "t", &s.dir.path().join("w1"), &[("SLOW", "1"), ("HOSTNAME_TAG", "w1")]);
    let id = m.force("app/build");
    wait_for(T, "the step to run on w1", || (m.build(id)["steps"][0]["state"] == "running").then_some(()));
    let _w2 = Worker::start(&m, "w2", "t", &s.dir.path().join("w2"), &[("HOSTNAME_TAG", "w2")]);
    wait_for(T, "w2 to connect", || {
        m.get("/api/v2/workers").json()["workers"]
            .as_array()?
            .iter()
            .find(|w| w["name"] == "w2" && w["connected"] == true)
            .map(|_| ())
    });
    let killed = Instant::now();
    w1.kill9();
    let b = m.finished(id, T);
    eprintln!("lost step noticed after {:?}", killed.elapsed());
    assert_eq!(b["result"], "RETRY", "{b:#}");
    assert_eq!(b["steps"][0]["result"], "RETRY");
    assert!(b["result_reason"].as_str().expect("reason").contains("worker w1 was lost"), "{b:#}");
    let retry = wait_for(T, "a retry build", || {
        m.get("/api/v2/builds").json()["builds"]
            .as_array()?
            .iter()
            .find(|x| x["reason"] == format!("retry of build {id}"))
            .cloned()
    });
    let r = m.finished(retry["id"].as_u64().expect("id"), T);
    assert_eq!(r["result"], "SUCCESS", "{r:#}");
    assert_eq!(r["worker"], "w2");
    assert!(log_of(&m, &r, "step-1").contains("done on w2"));
}

#[test]
fn a_frozen_worker_is_lost_after_the_heartbeat_timeout() {
    let s = setup(SLOW_ON_W1, &[("w1", "t", &["linux"])]);
    let m = Master::start(&s.config, &s.state);
    let w1 = Worker::start(&m, "w1", "t", &s.dir.path().join("w1"), &[("SLOW", "1")]);
    let id = m.force("app/build");
    wait_for(T, "the step to run", || (m.build(id)["steps"][0]["state"] == "running").then_some(()));
    // SIGSTOP: the connection stays open but nothing comes through it.
    let pid = w1.child.id() as i32;
    // SAFETY: stopping and continuing our own child process.
    unsafe { libc_kill(pid, 19) };
    let frozen = Instant::now();
    let b = m.finished(id, Duration::from_secs(20));
    let noticed = frozen.elapsed();
    // SAFETY: as above.
    unsafe { libc_kill(pid, 18) };
    assert_eq!(b["result"], "RETRY", "{b:#}");
    assert!(b["result_reason"].as_str().expect("reason").contains("no heartbeat"), "{b:#}");
    assert!(noticed < Duration::from_secs(5), "took {noticed:?} to notice a frozen worker (heartbeat 200 ms)");
}

#[test]
fn a_master_restart_keeps_finished_results_and_retries_running_builds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("ran-once");
    let pipeline = format!(
        "builders:\n  quick:\n    steps: [{{ run: echo quick result }}]\n  slow:\n    steps:\n      - run: 'if [ -f {m} ]; then echo second run; else touch {m}; sleep 60; fi'\n",
        m = marker.display()
    );
    make_repo(&dir.path().join("app"), &pipeline, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[])]);
    let state = dir.path().join("state");
    let mut m = Master::start(&config, &state);
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let quick = m.finished(m.force("app/quick"), T);
    assert_eq!(quick["result"], "SUCCESS");
    let slow = m.force("app/slow");
    wait_for(T, "the slow step to start", || marker.exists().then_some(()));
    m.kill();

    // Same gRPC port: the worker keeps dialing it.
    let m2 = Master::start_on(&config, &state, &m.grpc);
    let again = m2.build(quick["id"].as_u64().expect("id"));
    assert_eq!(again["result"], "SUCCESS");
    assert_eq!(again["steps"], quick["steps"]);
    assert!(log_of(&m2, &again, "step-1").contains("quick result"));
    let s = m2.build(slow);
    assert_eq!(s["state"], "finished");
    assert_eq!(s["result"], "RETRY");
    assert!(s["result_reason"].as_str().expect("reason").contains("master restarted"), "{s:#}");
    // The worker reconnects by itself and runs the retry.
    let retry = wait_for(T, "the retry", || {
        m2.get("/api/v2/builds").json()["builds"]
            .as_array()?
            .iter()
            .find(|x| x["reason"] == format!("retry of build {slow}"))
            .cloned()
    });
    let r = m2.finished(retry["id"].as_u64().expect("id"), T);
    assert_eq!(r["result"], "SUCCESS", "{r:#}");
    assert!(log_of(&m2, &r, "step-1").contains("second run"));
}

#[test]
fn garbage_on_the_grpc_port_does_not_hurt_the_master() {
    let s = setup("builders:\n  b:\n    steps: [{ run: echo ok }]\n", &[("w1", "t", &[])]);
    let m = Master::start(&s.config, &s.state);
    for junk in
        [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xff; 4096][..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04garbage"]
    {
        let mut c = std::net::TcpStream::connect(&m.grpc).expect("connect");
        let _ = c.write_all(junk);
    }
    let _w = Worker::start(&m, "w1", "t", &s.dir.path().join("w1"), &[]);
    let b = m.finished(m.force("app/b"), T);
    assert_eq!(b["result"], "SUCCESS");
}

#[test]
fn binary_garbage_and_a_100_mb_line_are_stored_whole() {
    let s = setup(
        "builders:\n  noisy:\n    steps:\n      - run: 'head -c 1000000 /dev/urandom; head -c 100000000 /dev/zero | tr \"\\0\" x'\n",
        &[("w1", "t", &[])],
    );
    let m = Master::start(&s.config, &s.state);
    let _w = Worker::start(&m, "w1", "t", &s.dir.path().join("w1"), &[]);
    let b = m.finished(m.force("app/noisy"), Duration::from_secs(120));
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    // The output, plus the worker's own header lines (checkout, command, exit status).
    let bytes = b["steps"][0]["log_bytes"].as_u64().expect("bytes");
    assert!((101_000_000..101_010_000).contains(&bytes), "{bytes}");
    let log = b["steps"][0]["log_id"].as_u64().expect("log");
    let mid = support::http(
        &m.http,
        "GET",
        &format!("/api/v2/logs/{log}/raw"),
        &[("Range", "bytes=20000000-20000009")],
        None,
    );
    assert_eq!(mid.body, b"xxxxxxxxxx");
    assert_eq!(mid.header("x-rbb-log-size"), Some(bytes.to_string().as_str()));
    let files: Vec<(String, u64)> = std::fs::read_dir(s.state.join("logs"))
        .expect("logs")
        .flat_map(|d| std::fs::read_dir(d.expect("d").path()).expect("dir"))
        .map(|f| f.expect("f"))
        .map(|f| (f.file_name().to_string_lossy().into_owned(), f.metadata().expect("meta").len()))
        .collect();
    let size_of = |ext: &str| files.iter().filter(|(n, _)| n.ends_with(ext)).map(|(_, l)| l).sum::<u64>();
    assert_eq!(size_of(".log"), bytes, "{files:?}");
    // Beside it, the stream switches: header, output, header again (9 bytes each).
    assert_eq!(size_of(".streams"), 27, "{files:?}");
}

#[test]
fn a_worker_speaking_another_protocol_version_is_refused() {
    let s = setup("builders:\n  b:\n    steps: [{ run: echo ok }]\n", &[("w1", "t", &[])]);
    let m = Master::start(&s.config, &s.state);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let status = rt.block_on(async {
        let mut client = rbb_schema::proto::worker_client::WorkerClient::connect(format!("http://{}", m.grpc))
            .await
            .expect("connect");
        let mut req = tonic::Request::new(tokio_stream::iter(Vec::<rbb_schema::proto::WorkerMessage>::new()));
        req.metadata_mut().insert("rbb-protocol", "0".parse().expect("header"));
        req.metadata_mut().insert("rbb-worker", "w1".parse().expect("header"));
        req.metadata_mut().insert("authorization", "Bearer t".parse().expect("header"));
        client.session(req).await.expect_err("refused")
    });
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("speaks worker protocol 2, the worker speaks 0"), "{}", status.message());
    wait_for(T, "the refusal in the master's log", || m.log_text().contains("another protocol version").then_some(()));
}

#[test]
fn sigterm_stops_a_master_with_workers_in_seconds_and_its_state_opens_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), "builders:\n  slow:\n    steps: [{ run: sleep 60 }]\n", &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[])]);
    let state = dir.path().join("state");
    let mut m = Master::start(&config, &state);
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let id = m.force("app/slow");
    wait_for(T, "the step to run", || (m.build(id)["steps"][0]["state"] == "running").then_some(()));
    let pid = m.child.id() as i32;
    let asked = std::time::Instant::now();
    // SAFETY: `kill` with a pid of our own child and SIGTERM.
    unsafe { libc_kill(pid, 15) };
    let status = wait_for(T, "the master to exit", || m.child.try_wait().expect("wait"));
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}\n{}", m.log_text());
    assert!(took < Duration::from_secs(6), "SIGTERM took {took:?} with a worker connected");
    // The state is free: the next master opens it and retries the build that ran.
    let m2 = Master::start_on(&config, &state, &m.grpc);
    let b = m2.build(id);
    assert_eq!(b["result"], "RETRY", "{b:#}");
}

#[test]
fn a_second_worker_with_a_connected_workers_name_is_refused_without_flapping() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: 'true' }]\n", &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let first = Worker::start(&m, "w1", "t", &dir.path().join("w1a"), &[]);
    wait_for(T, "w1 to connect", || {
        m.get("/api/v2/workers").json()["workers"][0]["connected"].as_bool().filter(|c| *c)
    });
    let second = Worker::start(&m, "w1", "t", &dir.path().join("w1b"), &[]);
    wait_for(T, "the second worker to be refused", || second.log_text().contains("already connected").then_some(()));
    // The first keeps its one session and runs builds.
    let b = m.finished(m.force("app/b"), T);
    assert_eq!(b["result"], "SUCCESS");
    let sessions = m.log_text().matches("worker connected").count();
    assert_eq!(sessions, 1, "the first worker's session was replaced:\n{}", m.log_text());
    assert!(first.log_text().matches("connected").count() >= 1);
}

/// With `checkout_url`, workers check out from the master's git service with their own name
/// and token, never from the mirror's path on the master's disk.
#[test]
fn with_a_checkout_url_workers_check_out_from_the_masters_git_service() {
    let s = setup("builders:\n  b:\n    steps:\n      - run: cat README.md\n", &[("w1", "s3cret-token", &[])]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut text = std::fs::read_to_string(&s.config).expect("config");
    text.push_str(&format!("checkout_url: http://127.0.0.1:{port}/\n"));
    std::fs::write(&s.config, text).expect("config");
    let m = Master::start_at(&s.config, &s.state, &format!("127.0.0.1:{port}"), "127.0.0.1:0");
    let _w = Worker::start(&m, "w1", "s3cret-token", &s.dir.path().join("w1"), &[]);
    let b = m.finished(m.force("app/b"), T);
    assert_eq!(b["result"], "SUCCESS", "{b:#}");
    let log = log_of(&m, &b, "step-1");
    assert!(log.contains(&format!("http://127.0.0.1:{port}/git/app.git")), "{log}");
    assert!(log.contains("the app readme"), "{log}");
    assert!(!log.contains("s3cret-token") && !log.contains("mirrors"), "{log}");
}
