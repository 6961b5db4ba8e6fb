//! The real `rbb-worker` binary: exit codes for a refusal and for SIGTERM; its steps die
//! with it, even by `kill -9`, and a restarted worker kills what a dead one left.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rbb_schema::proto::master_message::Msg as MasterMsg;
use rbb_schema::proto::worker_message::Msg;
use rbb_schema::proto::{Lease, StepResult};
use rbb_worker::guard::{GUARD_ARG, steps_dir};
use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, Command};
use tonic::Code;

use crate::fake_master::{FakeMaster, MasterSession};
use crate::wait_until;

fn worker(url: &str, workdir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rbb-worker"))
        .args(["--master", url, "--name", "bin-worker", "--labels", "a,b", "--max-steps", "2"])
        .arg("--workdir")
        .arg(workdir)
        .env("RBB_WORKER_TOKEN", "from-env")
        .env("RBB_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits for the child to exit; returns its exit code and stderr.
async fn finish(mut child: Child) -> (Option<i32>, String) {
    let mut stderr = child.stderr.take().unwrap();
    let mut text = String::new();
    let read = async { stderr.read_to_string(&mut text).await };
    let (status, _) = tokio::time::timeout(Duration::from_secs(15), async { tokio::join!(child.wait(), read) })
        .await
        .expect("rbb-worker did not exit in time");
    (status.unwrap().code(), text)
}

#[tokio::test]
async fn a_refused_binary_exits_with_code_2() {
    let scratch = tempfile::tempdir().unwrap();
    let master = FakeMaster::refusing("127.0.0.1:0".parse().unwrap(), Code::Unauthenticated, "unknown token").await;
    let child = worker(&master.url(), &scratch.path().join("work"));
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("unknown token"), "stderr:\n{stderr}");
    master.stop().await;
}

#[tokio::test]
async fn sigterm_stops_the_binary_with_code_0() {
    let scratch = tempfile::tempdir().unwrap();
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let child = worker(&master.url(), &scratch.path().join("work"));
    let mut session = master.next_session().await;
    assert_eq!(session.metadata.get("authorization").unwrap().to_str().unwrap(), "Bearer from-env");
    let hello = session.handshake(1000).await;
    assert_eq!(hello.name, "bin-worker");
    assert_eq!(hello.labels, ["a", "b"]);
    assert_eq!(hello.max_steps, 2);

    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(session.closed().await);
}

/// Processes (not zombies) whose environment holds `RBB_TEST_MARK=<mark>`: every process a
/// step started, however deep, and nothing else. `(pid, command line)`.
fn marked(mark: &str) -> Vec<(i32, String)> {
    let needle = format!("RBB_TEST_MARK={mark}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        if !environ.split(|&b| b == 0).any(|var| var == needle.as_bytes()) || crate::process_gone(pid) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_owned()));
    }
    found
}

/// The guard process of the worker using `workdir`.
fn guard_of(workdir: &Path) -> i32 {
    let steps = steps_dir(workdir);
    let wanted = format!("{GUARD_ARG}\0{}\0", steps.display());
    let mut guards = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).into_owned();
        if cmdline.contains(&wanted) && !crate::process_gone(pid) {
            guards.push(pid);
        }
    }
    assert_eq!(guards.len(), 1, "one guard expected for {}: {guards:?}", workdir.display());
    guards[0]
}

/// Starts the binary, leases it `sleep 30` and a step whose shell forks, and waits until both
/// sleeps run and the guard has recorded both groups. Returns the worker and its session.
async fn worker_with_two_sleeps(master: &mut FakeMaster, workdir: &Path, mark: &str) -> (Child, MasterSession) {
    crate::prepared_checkout(workdir, "builds/7", 7);
    let child = worker(&master.url(), workdir);
    let mut session = master.next_session().await;
    session.handshake(1000).await;
    for (id, command) in [(1, "sleep 30"), (2, "sh -c 'sleep 30; echo'; echo after")] {
        let lease = Lease {
            lease: id,
            build: 7,
            builder: "app/test".to_owned(),
            step_name: format!("step{id}"),
            checkout_dir: "builds/7".to_owned(),
            command: command.to_owned(),
            env: HashMap::from([("RBB_TEST_MARK".to_owned(), mark.to_owned())]),
            timeout_secs: 60,
            ..Lease::default()
        };
        session.send(MasterMsg::Lease(lease)).await;
    }
    wait_until("both steps' sleeps run", Duration::from_secs(10), || {
        marked(mark).iter().filter(|(_, cmd)| cmd == "sleep 30").count() == 2
    })
    .await;
    wait_until("the guard records each running step group", Duration::from_secs(5), || {
        std::fs::read_dir(steps_dir(workdir)).unwrap().count() == 2
    })
    .await;
    (child, session)
}

#[tokio::test]
async fn steps_die_with_a_killed_worker() {
    crate::init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let workdir = scratch.path().join("work");
    let mark = scratch.path().display().to_string();
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut child, mut session) = worker_with_two_sleeps(&mut master, &workdir, &mark).await;

    child.kill().await.unwrap();
    wait_until("no step process is left", Duration::from_secs(5), || marked(&mark).is_empty()).await;
    // The guard leaves no record and no process behind, and the worker reported nothing.
    wait_until("the guard has cleaned up", Duration::from_secs(5), || {
        std::fs::read_dir(steps_dir(&workdir)).unwrap().count() == 0
    })
    .await;
    while let Some(msg) = session.try_recv().await {
        assert!(!matches!(msg, Msg::Finished(_)), "a killed worker reports nothing: {msg:?}");
    }
}

#[tokio::test]
async fn a_restarted_worker_kills_what_a_dead_one_left() {
    crate::init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let workdir = scratch.path().join("work");
    let mark = scratch.path().display().to_string();
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut child, _session) = worker_with_two_sleeps(&mut master, &workdir, &mark).await;

    // Guard and worker both die: nothing is left to stop the steps.
    let guard = guard_of(&workdir);
    // SAFETY: signalling a process this test started (through the worker).
    assert_eq!(unsafe { libc::kill(guard, libc::SIGKILL) }, 0);
    wait_until("the guard is gone", Duration::from_secs(5), || crate::process_gone(guard)).await;
    child.kill().await.unwrap();
    let left = marked(&mark);
    assert!(left.len() >= 2, "the steps outlive a worker whose guard is gone: {left:?}");

    // A new worker on the same work directory kills them before it even connects.
    let mut again = worker(&master.url(), &workdir);
    let mut session = master.next_session().await;
    session.handshake(1000).await;
    wait_until("no step process is left", Duration::from_secs(5), || marked(&mark).is_empty()).await;
    assert_eq!(std::fs::read_dir(steps_dir(&workdir)).unwrap().count(), 0, "records are removed");

    // And it works as usual.
    let lease = Lease {
        lease: 3,
        build: 7,
        checkout_dir: "builds/7".to_owned(),
        command: "echo fine".to_owned(),
        ..Lease::default()
    };
    session.send(MasterMsg::Lease(lease)).await;
    let (_, finished) = session.until_finished(3).await;
    assert_eq!(finished.result, StepResult::Success as i32, "{finished:?}");
    again.kill().await.unwrap();
}

#[tokio::test]
async fn a_second_worker_on_a_busy_work_directory_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let workdir = scratch.path().join("work");
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    let mut first = worker(&master.url(), &workdir);
    let mut session = master.next_session().await;
    session.handshake(1000).await;

    let second = worker(&master.url(), &workdir);
    let (code, stderr) = finish(second).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("is in use by another rbb-worker"), "stderr:\n{stderr}");
    first.kill().await.unwrap();
}

/// The processes of a checkout (git and the transport it starts) die with a killed worker too.
#[tokio::test]
async fn a_checkout_dies_with_a_killed_worker() {
    crate::init_logs();
    let scratch = tempfile::tempdir().unwrap();
    let workdir = scratch.path().join("work");
    let mark = scratch.path().display().to_string();
    let mut master = FakeMaster::start("127.0.0.1:0".parse().unwrap()).await;
    // A transport that never answers: git waits on it as on a slow server.
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbb-worker"))
        .args(["--master", &master.url(), "--name", "bin-worker", "--token", "t"])
        .arg("--workdir")
        .arg(&workdir)
        .env("RBB_TEST_MARK", &mark)
        .env("GIT_SSH_COMMAND", "sh -c 'sleep 30' --")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut session = master.next_session().await;
    session.handshake(1000).await;
    let lease = Lease {
        lease: 1,
        build: 7,
        checkout_dir: "builds/7".to_owned(),
        checkout: Some(rbb_schema::proto::Checkout {
            url: "ssh://git.invalid/repo".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            ..Default::default()
        }),
        command: "true".to_owned(),
        ..Lease::default()
    };
    session.send(MasterMsg::Lease(lease)).await;
    wait_until("the checkout's transport runs", Duration::from_secs(10), || {
        marked(&mark).iter().any(|(_, cmd)| cmd == "sleep 30")
    })
    .await;

    child.kill().await.unwrap();
    wait_until("no process of the checkout is left", Duration::from_secs(5), || marked(&mark).is_empty()).await;
}
