//! The real `rbb-worker` binary: exit codes for a refusal and for SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, Command};
use tonic::Code;

use crate::fake_master::FakeMaster;

fn worker(url: &str, workdir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rbb-worker"))
        .args(["--master", url, "--name", "bin-worker", "--labels", "a,b"])
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
    assert_eq!(hello.max_steps, 1);

    let pid = i32::try_from(child.id().unwrap()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(session.closed().await);
}
