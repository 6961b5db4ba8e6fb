//! The state in PostgreSQL (docs/postgres.md): a real `rbb master` on a real server (the
//! throwaway cluster `cargo xtask test` starts), `rbb state migrate` from a redb state, and
//! `rbb state check` on schema versions older and newer than the binary's.

mod support;

use rbb_master::model::{BuildRecord, ChangeRecord, LogRecord, ScheduleRecord, StepRecord};
use rbb_master::store::{Batch, Migrate, SCHEMA_VERSION, Store, Sync, index_key, testing};
use rbb_schema::api::State;
use rbb_schema::results::Outcome;
use std::process::Command;
use std::time::Duration;
use support::*;

fn rbb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rbb")).args(args).output().expect("run rbb")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs SQL on the database at `url`.
fn sql(url: &str, statements: &str) {
    let pg = rbb_master::store::pg::Pg::connect(url, None).expect("connect");
    pg.read_conn().expect("conn").execute_batch(statements).expect("sql");
}

#[test]
fn a_master_on_postgres_runs_builds_keeps_them_across_a_kill_9_and_a_second_one_waits_as_its_standby() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  a:\n    steps: [{ run: 'true' }, { run: 'echo hello-from-postgres' }]\n  b:\n    steps: [{ run: 'exit 1' }]\n",
        &[],
    );
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[])]);
    let url = testing::fresh_database();
    // The password comes from the environment (the test server trusts loopback and ignores
    // it): it must appear in no log line.
    let mut text_cfg = std::fs::read_to_string(&config).expect("config");
    text_cfg.push_str(&format!("state:\n  url: {url}\n  password_env: RBB_TEST_PG_SECRET\n"));
    std::fs::write(&config, text_cfg).expect("config");
    let secret = "pg-secret-value-1f3e";
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("RBB_TEST_PG_SECRET", secret) };

    let mut m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let a = m.force("app/a");
    let b = m.force("app/b");
    assert_eq!(m.finished(a, Duration::from_secs(60))["result"], "SUCCESS");
    assert_eq!(m.finished(b, Duration::from_secs(60))["result"], "FAILURE");
    let log_id = m.build(a)["steps"][1]["log_id"].as_u64().expect("a log");
    let log = m.get(&format!("/api/v2/logs/{log_id}/raw"));
    assert!(log.text().contains("hello-from-postgres"), "{}", log.text());

    // A second master on the same database waits as a standby, and says who holds it.
    let second_log = dir.path().join("second.master.log");
    let mut second = Master::spawn(&config, &dir.path().join("state2"), "127.0.0.1:0", "127.0.0.1:0", &[], &second_log);
    let first_line = lines(&mut second).recv_timeout(T).expect("the second master's first line");
    assert!(first_line.contains("standby") && first_line.contains("forward"), "{first_line}");
    let said = wait_for(T, "the second master to say who holds the state", || {
        std::fs::read_to_string(&second_log).ok().filter(|l| l.contains("taking over when it stops"))
    });
    assert!(said.contains("holder=rbb on"), "{said}");
    assert!(!said.contains(secret), "{said}");
    let _ = second.kill();
    let _ = second.wait();
    // A state command that needs the lock is refused while a master holds it.
    let refused = Store::open_postgres(&url, None, Migrate::No).err().expect("the master holds the state");
    let said = refused.to_string();
    assert!(said.contains("in use by another rbb master") && said.contains("rbb on"), "{said}");

    // kill -9: the finished results are in the database; a new master picks them up.
    m.kill();
    let log_text = m.log_text();
    assert!(!log_text.contains(secret), "the password reached the log:\n{log_text}");
    assert!(log_text.contains(&rbb_master::store::pg::redact(&url)), "{log_text}");
    // Restarted with another state_dir (one the first master's files are not in): the
    // results are the database's; the logs are the first state_dir's, and the API says so.
    let m = Master::start(&config, &dir.path().join("state-elsewhere"));
    assert_eq!(m.build(a)["result"], "SUCCESS");
    assert_eq!(m.build(b)["result"], "FAILURE");
    let elsewhere = m.get(&format!("/api/v2/logs/{log_id}/raw"));
    assert_eq!(elsewhere.status, 404, "{}", elsewhere.text());
    assert!(elsewhere.text().contains("not in this master's state_dir"), "{}", elsewhere.text());
    let listed = builds(&m);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let _w = Worker::start(&m, "w1", "t", &dir.path().join("w1b"), &[]);
    let c = m.force("app/a");
    assert!(c > b, "ids keep growing after a restart: {c} after {b}");
    assert_eq!(m.finished(c, Duration::from_secs(60))["result"], "SUCCESS");
    let store = Store::open_postgres(&url, None, Migrate::No);
    assert!(store.is_err(), "the running master holds the database");
    // A check reads it without the lock, while the master runs.
    let check = rbb(&["state", "check", "--state", &url]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("indexes and counts: consistent"), "{}", text(&check));
    let active = text(&check).lines().find(|l| l.starts_with("active master:")).map(str::to_owned);
    let active = active.unwrap_or_else(|| panic!("the check names the active master:\n{}", text(&check)));
    assert!(active.contains("rbb on") && active.contains("term") && active.contains("lease renewed"), "{active}");
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[test]
fn a_standby_master_takes_over_when_the_active_one_is_killed_and_its_build_is_retried_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("ran-once");
    let pipeline = format!(
        "builders:\n  quick:\n    labels: [b-side]\n    steps: [{{ run: echo quick result }}]\n  slow:\n    steps:\n      - run: 'if [ -f {m} ]; then echo second run; else touch {m}; sleep 60; fi'\n",
        m = marker.display()
    );
    make_repo(&dir.path().join("app"), &pipeline, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[]), ("w2", "t", &["b-side"])]);
    let url = testing::fresh_database();
    let mut text_cfg = std::fs::read_to_string(&config).expect("config");
    text_cfg.push_str(&format!("state: {url}\n"));
    std::fs::write(&config, text_cfg).expect("config");
    // Both masters share the state directory (logs, mirrors), as they would over a shared
    // file system.
    let state = dir.path().join("state");
    let (grpc_a, grpc_b) = (free_port(), free_port());
    let mut a = Master::start_at(&config, &state, "127.0.0.1:0", &grpc_a);
    let b_log = dir.path().join("b.master.log");
    let mut b = Master::spawn(&config, &state, "127.0.0.1:0", &grpc_b, &["--standby"], &b_log);
    let b_lines = lines(&mut b);
    let first = b_lines.recv_timeout(T).expect("the standby's first line");
    let b_http = word_after(&first, "http=http://");
    assert!(first.contains("standby"), "{first}");
    wait_for(T, "the standby to wait", || {
        std::fs::read_to_string(&b_log).ok().filter(|l| l.contains("taking over when it stops")).map(|_| ())
    });
    // w1 knows both masters; w2 only the standby, whose gRPC port forwards to the active one.
    let mut w1 = spawn_worker(dir.path(), "w1", &format!("http://{grpc_a},http://{grpc_b}"), "");
    let mut w2 = spawn_worker(dir.path(), "w2", &format!("http://{grpc_b}"), "b-side");
    // The standby's API is the active master's: a build forced there is seen, live, here.
    let events = std::thread::spawn({
        let b_http = b_http.clone();
        // The only build's event when it finishes (a step's starts with "build").
        move || read_events_until(&b_http, "data: {\"id\":1,\"state\":\"finished\",\"result\":\"SUCCESS\"}")
    });
    let quick = a.finished(a.force("app/quick"), T);
    assert_eq!(quick["result"], "SUCCESS");
    assert_eq!(quick["worker"], "w2", "only the worker attached through the standby has the label");
    let seen = events.join().expect("events");
    assert_eq!(quick["id"], 1, "a fresh state's first build");
    let want = "data: {\"id\":1,\"state\":\"finished\",\"result\":\"SUCCESS\"}";
    assert!(seen.contains(want), "the standby's event stream did not announce {want}:\n{seen}");
    let through_b = http(&b_http, "GET", &format!("/api/v2/builds/{}", quick["id"]), &[], None);
    assert_eq!(through_b.status, 200, "{}", through_b.text());
    assert_eq!(through_b.json()["result"], "SUCCESS");
    let raw = http(&b_http, "GET", "/api/v2/logs/1/raw", &[("Range", "bytes=0-4")], None);
    assert_eq!(raw.status, 206, "{}", raw.text());
    let whole = a.get("/api/v2/logs/1/raw").text();
    assert_eq!(raw.text(), whole[..5], "a range through the standby is the active master's");
    // The database ends every session of both masters, as a restart of the server would:
    // the standby connects again and goes on waiting, and the active master stays active
    // (its lease, still renewed, keeps the standby off the lock it finds free). The
    // standby's sessions end first (the statement waits until they have): a standby still
    // waiting on the lock when the active master's session ends is granted it, as after a
    // `kill -9`.
    let pg = rbb_master::store::pg::Pg::connect(&url, None).expect("connect");
    let killed = pg
        .read_conn()
        .expect("conn")
        .query_text(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name LIKE $2 \
             UNION ALL SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&format!("%(pid {})", a.child.id()), &format!("%(pid {})", b.id())],
        )
        .expect("terminate");
    assert!(killed.len() >= 2, "both masters have connections: {}", killed.len());
    wait_for(T, "the standby to connect again", || {
        std::fs::read_to_string(&b_log)
            .ok()
            .filter(|l| l.contains("the wait for the state ended; connecting again"))
            .map(|_| ())
    });
    // A request at the very moment the connection ends may fail (its transaction is not
    // stored); the master's next ones go through on a new connection.
    let forced = wait_for(T, "a force accepted after the interruption", || {
        let r = a.post("/api/v2/builders/app%2Fquick/force", "{}");
        (r.status == 201).then(|| r.json()["build"].as_u64()).flatten()
    });
    let again = a.finished(forced, T);
    assert_eq!(again["result"], "SUCCESS", "the active master goes on after the interruption: {again:#}");
    assert_eq!(builds(&a).len(), 2, "a refused force left no build behind");
    // Its first write took the lock again, and the standby waits on the lock once more.
    wait_for(T, "the standby to see the active master on the lock again", || {
        std::fs::read_to_string(&b_log).ok().filter(|l| l.contains("holds the state again")).map(|_| ())
    });
    assert!(!std::fs::read_to_string(&b_log).unwrap_or_default().contains("taking the state over"));
    let slow = a.force("app/slow");
    wait_for(T, "the slow step to start", || marker.exists().then_some(()));
    a.kill();
    let took = std::time::Instant::now();

    // The standby opens the state the moment the lock is free, and listens where it
    // forwarded.
    let line = b_lines.recv_timeout(T).expect("the standby's listening line");
    let listening = took.elapsed();
    assert!(line.contains("listening"), "{line}");
    assert_eq!(word_after(&line, "http=http://"), b_http);
    let b = Master { child: b, http: b_http.clone(), grpc: grpc_b.clone(), log: b_log };
    assert_eq!(b.build(quick["id"].as_u64().expect("id"))["result"], "SUCCESS");
    let s = b.build(slow);
    assert_eq!(s["result"], "RETRY", "{s:#}");
    // The worker turns to the other master by itself and runs the retry there.
    let r = retry_finished(&b, slow);
    assert_eq!(r["result"], "SUCCESS", "{r:#}");
    let unfinished = b.get("/api/v2/builds?state=running").json()["meta"]["total"].as_u64();
    assert_eq!(unfinished, Some(0));
    // The active master took the lock again with its first write: the standby waited on
    // the lock, not on the lease (10 s), and took over when the lock went.
    assert!(listening < Duration::from_secs(5), "the standby took {listening:?} to take over");
    for w in [&mut w1, &mut w2] {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(child: &std::process::Child, signal: &str) {
    let done = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().expect("kill");
    assert!(done.success(), "kill -{signal}");
}

/// The lease's epoch (the number of terms masters took on the database) and when it was
/// last renewed.
fn lease(url: &str) -> (i64, String) {
    let pg = rbb_master::store::pg::Pg::connect(url, None).expect("connect");
    let conn = pg.read_conn().expect("conn");
    let rows =
        conn.query_text("SELECT epoch, renewed_at::text FROM rbb_master_lease WHERE id = 1", &[]).expect("lease");
    rows.first().map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))).expect("a lease row")
}

fn lease_epoch(url: &str) -> i64 {
    lease(url).0
}

#[test]
fn a_hung_master_is_fenced_off_when_its_lease_runs_out_and_writes_nothing_over_the_takeover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("ran-once");
    let release = dir.path().join("release");
    // The first run waits for `release` (it is still running on the hung master's worker
    // when the standby takes over); the retry finishes at once.
    let pipeline = format!(
        "builders:\n  slow:\n    steps:\n      - run: 'if [ -f {m} ]; then echo second run; else touch {m}; \
         while [ ! -f {r} ]; do sleep 0.05; done; echo first run; fi'\n",
        m = marker.display(),
        r = release.display()
    );
    make_repo(&dir.path().join("app"), &pipeline, &[]);
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[]), ("w2", "t", &[])]);
    let url = testing::fresh_database();
    let mut text_cfg = std::fs::read_to_string(&config).expect("config");
    text_cfg.push_str(&format!("state:\n  url: {url}\n  lease: 4s\n"));
    std::fs::write(&config, text_cfg).expect("config");
    let state = dir.path().join("state");
    let grpc_b = free_port();
    let mut a = Master::start(&config, &state);
    let first_term = lease_epoch(&url);
    let b_log = dir.path().join("b.master.log");
    let mut b = Master::spawn(&config, &state, "127.0.0.1:0", &grpc_b, &["--standby"], &b_log);
    let b_lines = lines(&mut b);
    let b_http = word_after(&b_lines.recv_timeout(T).expect("the standby's first line"), "http=http://");
    // w1 knows only A: it stays with A while A hangs.
    let mut w1 = spawn_worker(dir.path(), "w1", &format!("http://{}", a.grpc), "");
    let slow = a.force("app/slow");
    wait_for(T, "the first run to start", || marker.exists().then_some(()));
    assert_eq!(a.build(slow)["worker"], "w1");
    // w2 knows only B (forwarded to A until B takes over).
    let mut w2 = spawn_worker(dir.path(), "w2", &format!("http://{grpc_b}"), "");

    // A renews its lease (every second) and keeps the state through two renewals.
    let mut renewals = vec![lease(&url)];
    while renewals.len() < 3 {
        let now = wait_for(T, "a renewal", || Some(lease(&url)).filter(|l| Some(l) != renewals.last()));
        assert_eq!(now.0, first_term, "A's term goes on while it renews: {renewals:?} then {now:?}");
        renewals.push(now);
    }
    assert!(a.child.try_wait().expect("wait").is_none(), "A still runs");
    // A hangs: its process stops, its connections stay open, its lease is not renewed.
    signal(&a.child, "STOP");
    let hung = std::time::Instant::now();
    let line = b_lines.recv_timeout(T).expect("the standby's listening line");
    let took = hung.elapsed();
    assert!(line.contains("listening"), "{line}");
    // Not before the lease ran out (it was renewed at most a quarter of it before the stop).
    assert!(took >= Duration::from_secs(3), "the standby took over after {took:?}, inside A's 4 s lease");
    assert!(took < Duration::from_secs(20), "the standby took {took:?} to take over");
    let b_master = Master { child: b, http: b_http.clone(), grpc: grpc_b.clone(), log: b_log.clone() };
    assert!(
        b_master.log_text().contains("did not renew its lease"),
        "the standby says why it took over:\n{}",
        b_master.log_text()
    );
    assert!(lease_epoch(&url) > first_term, "the takeover is a new term");
    assert_eq!(b_master.build(slow)["result"], "RETRY");
    let r = retry_finished(&b_master, slow);
    assert_eq!(r["result"], "SUCCESS", "{r:#}");
    assert_eq!(r["worker"], "w2", "w1 still waits on the hung master");

    // The first run ends now, on w1, which reports to A; A wakes up fenced off: it writes
    // nothing and stops, saying why.
    std::fs::write(&release, "").expect("release");
    signal(&a.child, "CONT");
    let status = wait_for(T, "the fenced master to exit", || a.child.try_wait().expect("wait"));
    assert!(!status.success(), "a fenced master exits with an error");
    let said = a.log_text();
    assert!(said.contains("no longer holds its state"), "{said}");
    assert!(said.contains("--standby"), "it says how to serve again:\n{said}");
    let old = b_master.build(slow);
    assert_eq!(old["result"], "RETRY", "the fenced master's late result did not land: {old:#}");
    assert_eq!(b_master.build(r["id"].as_u64().expect("id"))["result"], "SUCCESS");
    let running = b_master.get("/api/v2/builds?state=running").json()["meta"]["total"].as_u64();
    assert_eq!(running, Some(0));
    // B goes on: a new build runs.
    let next = b_master.force("app/slow");
    assert_eq!(b_master.finished(next, T)["result"], "SUCCESS");
    for w in [&mut w1, &mut w2] {
        let _ = w.kill();
        let _ = w.wait();
    }
}

#[test]
fn each_push_makes_one_build_across_two_takeovers_of_three_masters_including_one_pushed_meanwhile() {
    pushes_across_a_takeover(true);
}

/// The same with a state_dir for each master: the new master's mirror is its own, and its
/// baseline is the newest push the state recorded, so the push made around the takeover is
/// built (once) all the same.
#[test]
fn each_push_makes_one_build_across_a_takeover_by_a_master_with_a_state_dir_of_its_own() {
    pushes_across_a_takeover(false);
}

fn pushes_across_a_takeover(shared_state_dir: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("app");
    make_repo(
        &repo,
        "builders:\n  build:\n    on:\n      push: { branches: [main] }\n    steps: [{ run: echo built }]\n",
        &[("README.md", "readme\n")],
    );
    let url = testing::fresh_database();
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: app\n    poll_interval: 100ms\nworkers:\n  - name: w1\n    token: t\n    max_steps: 2\nstate: {url}\n"
        ),
    )
    .expect("config");
    // A shared state directory: the mirrors (and the heads each one has recorded) are the
    // active master's, whichever it is.
    let state = dir.path().join("state");
    let state_b = if shared_state_dir { state.clone() } else { dir.path().join("state-b") };
    let (grpc_a, grpc_b) = (free_port(), free_port());
    let mut a = Master::start_at(&config, &state, "127.0.0.1:0", &grpc_a);
    let b_log = dir.path().join("b.master.log");
    let spawn_b = || {
        let mut b = Master::spawn(&config, &state_b, "127.0.0.1:0", &grpc_b, &[], &b_log);
        let b_lines = lines(&mut b);
        (b, b_lines)
    };
    // With a shared state_dir, B waits as a standby from the start; with one of its own it
    // starts after A died and a commit was pushed (the push no running master has seen).
    let mut standby = shared_state_dir.then(|| {
        let (b, b_lines) = spawn_b();
        let first = b_lines.recv_timeout(T).expect("the standby's first line");
        assert!(first.contains("standby"), "{first}");
        (b, b_lines)
    });
    // With a shared state_dir, a third master C waits too: it forwards to whichever master
    // is active, and takes over after B.
    let grpc_c = free_port();
    let c_log = dir.path().join("c.master.log");
    let third = shared_state_dir.then(|| {
        let mut c = Master::spawn(&config, &state, "127.0.0.1:0", &grpc_c, &[], &c_log);
        let c_lines = lines(&mut c);
        let first = c_lines.recv_timeout(T).expect("C's first line");
        assert!(first.contains("standby"), "{first}");
        (c, c_lines, word_after(&first, "http=http://"))
    });
    let masters = format!("http://{grpc_a},http://{grpc_b},http://{grpc_c}");
    let mut w1 = spawn_worker(dir.path(), "w1", &masters, "");
    let polled = |m: &Master| {
        let v = m.get("/api/v2/repositories").json();
        (!v["repositories"][0]["last_success"].is_null()).then_some(())
    };
    wait_for(T, "the first poll", || polled(&a));
    let built = |m: &Master, commit: &str| {
        let b = wait_for(T, "a build of the commit", || {
            builds(m).into_iter().find(|b| b["commit"] == commit && b["builder"] == "app/build")
        });
        let b = m.finished(b["id"].as_u64().expect("id"), T);
        assert_eq!(b["result"], "SUCCESS", "{b:#}");
    };
    let c1 = commit(&repo, "src/one.c", "1\n", 1, "One");
    built(&a, &c1);
    a.kill();
    // Pushed while no master (or the new one) runs: built once, by the new master.
    let c2 = commit(&repo, "src/two.c", "2\n", 2, "Two");
    let (b, b_lines) = standby.take().unwrap_or_else(spawn_b);
    let line = b_lines.recv_timeout(T).expect("B's listening line");
    assert!(line.contains("listening"), "{line}");
    let b = Master { child: b, http: word_after(&line, "http=http://"), grpc: grpc_b.clone(), log: b_log.clone() };
    built(&b, &c2);
    let c3 = commit(&repo, "src/three.c", "3\n", 3, "Three");
    built(&b, &c3);
    let all = builds(&b);
    for c in [&c1, &c2, &c3] {
        let n = all.iter().filter(|x| x["commit"] == c.as_str()).count();
        assert_eq!(n, 1, "commit {c} has {n} builds: {all:#?}");
        let recorded = changes(&b).iter().filter(|x| x["commit"] == c.as_str()).count();
        assert_eq!(recorded, 1, "commit {c} is recorded {recorded} times");
    }
    assert_eq!(all.len(), 3, "{all:#?}");
    if let Some((c, c_lines, c_http)) = third {
        // C forwards to B now: the same builds.
        wait_for(T, "C to show B's builds", || {
            let r = http(&c_http, "GET", "/api/v2/builds?limit=1000", &[], None);
            (r.status == 200 && r.json()["builds"].as_array().map(Vec::len) == Some(3)).then_some(())
        });
        let mut b = b;
        b.kill();
        let line = c_lines.recv_timeout(T).expect("C's listening line");
        assert!(line.contains("listening"), "{line}");
        let c = Master { child: c, http: c_http, grpc: grpc_c.clone(), log: c_log };
        let c4 = commit(&repo, "src/four.c", "4\n", 4, "Four");
        built(&c, &c4);
        let all = builds(&c);
        assert_eq!(all.len(), 4, "one build per push across two takeovers: {all:#?}");
        assert_eq!(all.iter().filter(|x| x["commit"] == c4.as_str()).count(), 1);
    }
    let _ = w1.kill();
    let _ = w1.wait();
}

#[test]
fn a_cron_minute_fires_once_across_two_masters_on_one_state() {
    use rbb_master::server::{MasterOptions, open};
    // 2026-11-24T10:00:00Z.
    const TEN: i64 = 1_795_514_400;
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  nightly:\n    on:\n      schedule: [{ cron: \"* * * * *\", only_if_changed: false }]\n    steps: [{ run: echo nightly }]\n",
        &[],
    );
    let url = testing::fresh_database();
    std::fs::write(
        dir.path().join("rbb.yaml"),
        format!("repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\nstate: {url}\n"),
    )
    .expect("config");
    let options = |standby: bool| MasterOptions {
        config: dir.path().join("rbb.yaml"),
        state_dir: Some(dir.path().join("state")),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: "127.0.0.1:0".parse().expect("addr"),
        heartbeat: Duration::from_secs(1),
        migrate: false,
        standby,
    };
    let count = |m: &rbb_master::server::Master| m.engine.builds_of("app/nightly", 1000).expect("builds").len();
    let a = open(&options(false)).expect("master A");
    // B waits for the state while A runs.
    let b = std::thread::spawn({
        let opts = options(true);
        move || open(&opts).expect("master B")
    });
    assert_eq!(a.engine.cron_tick(TEN + 5 * 60 + 10).expect("tick").len(), 1, "10:05 fires on A");
    assert!(a.engine.cron_tick(TEN + 5 * 60 + 20).expect("tick").is_empty(), "once");
    assert!(!b.is_finished(), "B is a standby while A holds the state");
    drop(a);
    let b = b.join().expect("B took over");
    assert!(b.engine.cron_tick(TEN + 5 * 60 + 50).expect("tick").is_empty(), "10:05 fired on A: not again on B");
    assert_eq!(b.engine.cron_tick(TEN + 6 * 60 + 5).expect("tick").len(), 1, "10:06 fires on B");
    assert!(b.engine.cron_tick(TEN + 6 * 60 + 30).expect("tick").is_empty(), "once");
    assert_eq!(count(&b), 2);
}

const T: Duration = Duration::from_secs(60);

/// `rbb-worker` named `name` (token `t`) dialing `masters` (comma-separated) with `labels`,
/// its work and log under `dir`.
fn spawn_worker(dir: &std::path::Path, name: &str, masters: &str, labels: &str) -> std::process::Child {
    let err = std::fs::File::create(dir.join(format!("{name}.worker.log"))).expect("log");
    Command::new(worker_bin())
        .args(["--master", masters, "--name", name, "--token", "t", "--labels", labels, "--workdir"])
        .arg(dir.join(name))
        .stderr(err)
        .spawn()
        .expect("worker")
}

/// The retry of build `lost` once it has finished, as `m` shows it.
fn retry_finished(m: &Master, lost: u64) -> serde_json::Value {
    let retry = wait_for(T, "the retry", || {
        m.get("/api/v2/builds").json()["builds"]
            .as_array()?
            .iter()
            .find(|x| x["reason"] == format!("retry of build {lost}"))
            .cloned()
    });
    m.finished(retry["id"].as_u64().expect("id"), T)
}

/// The lines a child prints, as they come.
fn lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn word_after(line: &str, prefix: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {line:?}"))
        .to_owned()
}

/// Reads `/api/v2/events` at `addr` until `needle` arrives (a minute at most); answers what
/// was read.
fn read_events_until(addr: &str, needle: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(s, "GET /api/v2/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").expect("request");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let until = std::time::Instant::now() + T;
    while !String::from_utf8_lossy(&seen).contains(needle) && std::time::Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn build(id: u64, change: u64, result: Outcome) -> BuildRecord {
    let steps = (0..3)
        .map(|n| StepRecord {
            state: State::Finished,
            result: Some(if n == 2 { result } else { Outcome::Success }),
            exit_code: Some(if n == 2 && result == Outcome::Failure { 1 } else { 0 }),
            started_at: Some(1_000 + id),
            finished_at: Some(2_000 + id),
            log_id: Some(id * 3 + u64::from(n)),
            log_bytes: Some(100 + id),
            ..StepRecord::pending(n, &format!("step {n}"))
        })
        .collect();
    BuildRecord {
        id,
        builder: format!("repo{}/b{}", id % 7, id % 13),
        repo: format!("repo{}", id % 7),
        repo_url: "/srv/git/repo".into(),
        branch: if id.is_multiple_of(5) { "feature/x".into() } else { "main".into() },
        commit: format!("{:040x}", change * 7919),
        plan_hash: "sha256:plan".into(),
        pipeline_blob: Some("blob".into()),
        reason: "push".into(),
        event: "push".into(),
        properties: [("k".to_owned(), format!("v{id}"))].into(),
        priority: 0,
        state: State::Finished,
        result: Some(result),
        result_reason: String::new(),
        worker: Some(format!("w{}", id % 4)),
        waits_for: Vec::new(),
        halted: false,
        cancelled: false,
        attempt: 1,
        worker_losses: 0,
        checked_out: true,
        changes: vec![change],
        submitted_at: 500 + id,
        started_at: Some(1_000 + id),
        finished_at: Some(2_000 + id),
        rebuild_of: None,
        steps,
    }
}

/// A redb state with `n` finished builds (3 steps and logs each), their changes, a
/// schedule and a plan, written the way the engine writes them.
fn write_redb_state(path: &std::path::Path, n: u64) {
    let store = Store::open(path).expect("open redb");
    for chunk in (1..=n).collect::<Vec<_>>().chunks(100) {
        let builds: Vec<BuildRecord> = chunk
            .iter()
            .map(|&id| {
                build(id, id.div_ceil(4), if id.is_multiple_of(3) { Outcome::Failure } else { Outcome::Success })
            })
            .collect();
        let logs: Vec<LogRecord> = chunk
            .iter()
            .flat_map(|&id| {
                (0..3).map(move |s| LogRecord {
                    id: id * 3 + s,
                    build: id,
                    step: s as u32,
                    file: format!("{}/{}", id, s),
                    bytes: 100 + id,
                    finished: true,
                    created_at: Some(1_000 + id),
                    compressed: false,
                    expired: false,
                })
            })
            .collect();
        let changes: Vec<ChangeRecord> = chunk
            .iter()
            .filter(|&&id| id % 4 == 1)
            .map(|&id| ChangeRecord {
                id: id.div_ceil(4),
                repo: format!("repo{}", id % 7),
                branch: "main".into(),
                commit: format!("{:040x}", id.div_ceil(4) * 7919),
                author: "A U Thor".into(),
                email: "a@example.com".into(),
                time: 1_700_000_000 + id as i64,
                message: format!("change {id}\n\nwith a body"),
                files: vec!["src/lib.rs".into()],
                event: "push".into(),
                source: "poll".into(),
                recorded_at: 400 + id,
                pull_request: None,
            })
            .collect();
        store
            .commit(
                Batch {
                    builds: builds.iter().collect(),
                    logs: logs.iter().collect(),
                    changes: changes.iter().collect(),
                    ..Batch::default()
                },
                Sync::Lazy,
            )
            .expect("commit");
    }
    let schedule = ScheduleRecord { checked_minute: 29_000_000, fired_minute: Some(28_999_990), last_commit: None };
    store
        .commit(Batch { schedules: vec![("repo1/b1#0", &schedule)], ..Batch::default() }, Sync::Durable)
        .expect("schedule");
    rbb_master::audit::record(
        store.database(),
        rbb_schema::api::AuditEntry {
            id: 0,
            at_ms: 1,
            who: "alice".into(),
            role: rbb_schema::config::Access::Admin,
            action: "force".into(),
            target: "repo1/b1".into(),
            from: "127.0.0.1:1".into(),
            status: 201,
            result: "ok".into(),
        },
    )
    .expect("audit");
}

fn every_build(s: &Store) -> Vec<BuildRecord> {
    let mut out = Vec::new();
    s.scan_builds(None, false, |b| {
        out.push(b);
        true
    })
    .expect("scan");
    out
}

#[test]
fn rbb_state_migrate_copies_1000_builds_record_for_record_and_refuses_a_database_that_is_not_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    write_redb_state(&state.join("state.redb"), 1000);
    let url = testing::fresh_database();

    let out = rbb(&["state", "migrate", "--from", state.to_str().expect("utf-8"), "--to", &url]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("counts match"), "{}", text(&out));

    let from = Store::open(&state.join("state.redb")).expect("redb");
    let to = Store::open_postgres(&url, None, Migrate::No).expect("postgres");
    assert_eq!(to.table_counts().expect("counts"), from.table_counts().expect("counts"));
    let (a, b) = (every_build(&from), every_build(&to));
    assert_eq!(a.len(), 1000);
    assert_eq!(a, b, "every build, field for field");
    for id in 1..=3000 {
        assert_eq!(to.log(id).expect("log"), from.log(id).expect("log"), "log {id}");
    }
    for id in 1..=250 {
        assert_eq!(to.change(id).expect("change"), from.change(id).expect("change"), "change {id}");
    }
    assert_eq!(to.schedules().expect("schedules"), from.schedules().expect("schedules"));
    assert_eq!(to.check_indexes().expect("check"), None);
    for key in ["builds", "changes", &index_key("result", "FAILURE"), &index_key("builder", "repo3/b3")] {
        assert_eq!(to.count(key).expect("count"), from.count(key).expect("count"), "{key}");
    }
    // Newest first under an index, the same on both.
    let page = |s: &Store| {
        let mut ids = Vec::new();
        s.scan_builds(Some(&index_key("result", "FAILURE")), true, |b| {
            ids.push(b.id);
            ids.len() < 50
        })
        .expect("scan");
        ids
    };
    assert_eq!(page(&to), page(&from));
    assert_eq!(page(&to)[0], 999);
    let audit = rbb_master::audit::list(to.database(), None, 10).expect("audit");
    assert_eq!(audit.entries.len(), 1);
    drop((from, to));

    // Again into the same database: refused, nothing changed.
    let again = rbb(&["state", "migrate", "--from", state.to_str().expect("utf-8"), "--to", &url]);
    assert!(!again.status.success());
    assert!(text(&again).contains("is not empty"), "{}", text(&again));
    let to = Store::open_postgres(&url, None, Migrate::No).expect("postgres");
    assert_eq!(to.count("builds").expect("count"), 1000);
}

#[test]
fn a_state_written_by_the_previous_release_migrates_into_postgres() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("v1");
    std::fs::create_dir_all(&state).expect("mkdir");
    std::fs::copy(root().join("testdata/state/v1/state.redb"), state.join("state.redb")).expect("copy");
    let url = testing::fresh_database();
    let out = rbb(&["state", "migrate", "--from", state.to_str().expect("utf-8"), "--to", &url]);
    assert!(out.status.success(), "{}", text(&out));
    let to = Store::open_postgres(&url, None, Migrate::No).expect("postgres");
    assert_eq!(to.count("builds").expect("count"), 6);
    assert_eq!(to.count(&index_key("builder", "app/build")).expect("count"), 3);
    assert_eq!(to.check_indexes().expect("check"), None);
}

#[test]
fn rbb_state_check_reports_older_and_newer_schemas_and_a_master_migrates_only_when_asked() {
    let url = testing::fresh_database();
    drop(Store::open_postgres(&url, None, Migrate::No).expect("create"));
    let ok = rbb(&["state", "check", "--state", &url]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains(&format!("schema version: {SCHEMA_VERSION} (this rbb: {SCHEMA_VERSION})")),
        "{}",
        text(&ok)
    );

    // Schema 1: records without indexes. Put two builds in, then take the indexes away.
    {
        let s = Store::open_postgres(&url, None, Migrate::No).expect("open");
        let (b1, b2) = (build(1, 1, Outcome::Success), build(2, 1, Outcome::Failure));
        s.commit(Batch { builds: vec![&b1, &b2], ..Batch::default() }, Sync::Durable).expect("commit");
    }
    let version = |v: u64| {
        format!(
            "UPDATE rbb_meta SET v = '\\x{v:016x}'::bytea WHERE k = convert_to('schema_version', 'UTF8') || '\\x0000'::bytea"
        )
    };
    sql(&url, &format!("DELETE FROM rbb_build_idx; DELETE FROM rbb_counts; {}", version(1)));
    let older = rbb(&["state", "check", "--state", &url]);
    assert_eq!(older.status.code(), Some(1), "{}", text(&older));
    assert!(text(&older).contains("older than this rbb"), "{}", text(&older));
    let refused = Store::open_postgres(&url, None, Migrate::No).err().expect("an older schema is refused");
    assert!(refused.to_string().contains("--migrate"), "{refused}");

    let migrated = rbb(&["state", "check", "--state", &url, "--migrate"]);
    assert!(migrated.status.success(), "{}", text(&migrated));
    assert!(text(&migrated).contains(&format!("migrated to schema version {SCHEMA_VERSION}")), "{}", text(&migrated));
    let s = Store::open_postgres(&url, None, Migrate::No).expect("now current");
    assert_eq!(s.count(&index_key("result", "FAILURE")).expect("count"), 1);
    assert_eq!(s.check_indexes().expect("check"), None);
    drop(s);

    sql(&url, &version(SCHEMA_VERSION + 1));
    let newer = rbb(&["state", "check", "--state", &url]);
    assert_eq!(newer.status.code(), Some(1), "{}", text(&newer));
    assert!(text(&newer).contains("newer than this rbb"), "{}", text(&newer));
    let refused = Store::open_postgres(&url, None, Migrate::Yes).err().expect("a newer schema is refused");
    assert!(refused.to_string().contains("newer than this master"), "{refused}");
}

#[test]
fn a_write_postgres_refuses_fails_the_whole_commit_and_stores_nothing_of_it() {
    let url = testing::fresh_database();
    let s = Store::open_postgres(&url, None, Migrate::No).expect("open");
    let b1 = build(1, 1, Outcome::Success);
    s.commit(Batch { builds: vec![&b1], ..Batch::default() }, Sync::Durable).expect("first commit");
    // Log records longer than 10 bytes are refused by the server from now on: the write is
    // pipelined behind the build's, and its failure must undo the build's too.
    sql(&url, "ALTER TABLE rbb_logs ADD CONSTRAINT short CHECK (length(v) < 10)");
    let b2 = build(2, 1, Outcome::Failure);
    let log = LogRecord {
        id: 9,
        build: 2,
        step: 0,
        file: "2/0".into(),
        bytes: 1,
        finished: true,
        created_at: None,
        compressed: false,
        expired: false,
    };
    let refused = s.commit(Batch { builds: vec![&b2], logs: vec![&log], ..Batch::default() }, Sync::Lazy);
    assert!(refused.is_err(), "the refused write must fail the commit");
    assert_eq!(s.build(2).expect("read"), None, "nothing of a refused commit is stored");
    assert_eq!(s.count("builds").expect("count"), 1);
    assert_eq!(s.check_indexes().expect("check"), None);
    // The connection is usable again: the next commit goes through.
    sql(&url, "ALTER TABLE rbb_logs DROP CONSTRAINT short");
    s.commit(Batch { builds: vec![&b2], logs: vec![&log], ..Batch::default() }, Sync::Lazy).expect("commit");
    assert_eq!(s.build(2).expect("read"), Some(b2));
    assert_eq!(s.log(9).expect("read"), Some(log));
    assert_eq!(s.count("builds").expect("count"), 2);
}

/// The `rbb state` commands of docs/postgres.md, as written there (with this test's state
/// directory and database in place of the example's).
#[test]
fn the_state_commands_of_the_postgres_doc_work_as_written() {
    let doc = std::fs::read_to_string(root().join("docs/postgres.md")).expect("docs/postgres.md");
    let commands: Vec<&str> = doc.lines().map(str::trim).filter(|l| l.starts_with("rbb state ")).collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    write_redb_state(&state.join("state.redb"), 10);
    let url = testing::fresh_database();
    std::fs::write(dir.path().join("rbb.yaml"), format!("repositories:\n  - url: /srv/git/app\nstate: {url}\n"))
        .expect("config");
    for line in commands {
        let line = line
            .replace("/var/lib/rbb", state.to_str().expect("utf-8"))
            .replace("postgres://rbb@db.internal:5432/rbb", &url);
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_rbb")).args(&args).current_dir(dir.path()).output().expect("rbb");
        assert!(out.status.success(), "{line}: {}", text(&out));
    }
    let s = Store::open_postgres(&url, None, Migrate::No).expect("open");
    assert_eq!(s.count("builds").expect("count"), 10);
}

#[test]
fn state_commands_and_a_standby_refuse_bad_input_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nothing-here");
    let out = rbb(&["state", "migrate", "--from", missing.to_str().expect("utf-8"), "--to", "postgres://u@h/db"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no state at"), "{}", text(&out));
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    write_redb_state(&state.join("state.redb"), 1);
    let out = rbb(&["state", "migrate", "--from", state.to_str().expect("utf-8"), "--to", "/tmp/elsewhere"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--to must be a postgres:// URL"), "{}", text(&out));
    let out = rbb(&["state", "check", "--state", missing.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no state at"), "{}", text(&out));
    // A server nobody listens on: named, without the password.
    let out = rbb(&["state", "check", "--state", "postgres://rbb:hunter2@127.0.0.1:1/db"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("postgres://rbb:<hidden>@127.0.0.1:1/db") && !said.contains("hunter2"), "{said}");
    // --standby needs a PostgreSQL state.
    make_repo(&dir.path().join("app"), "builders:\n  a:\n    steps: [{ run: 'true' }]\n", &[]);
    let config = write_config(dir.path(), &["app"], &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_rbb"))
        .args(["master", "--standby", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .expect("rbb master");
    assert!(!out.status.success());
    assert!(text(&out).contains("--standby needs a PostgreSQL state"), "{}", text(&out));
}
