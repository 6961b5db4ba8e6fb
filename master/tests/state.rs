//! The state directory across versions and crashes: a state written by the previous
//! release opens (its indexes are built at open), and after a `kill -9` under load the
//! indexes and counts agree with the records.

mod support;

use rbb_master::store::{Store, index_key};
use std::time::Duration;
use support::*;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

#[test]
fn a_state_written_by_schema_version_1_opens_with_its_history_indexed() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&root().join("testdata/state/v1"), dir.path());
    let store = Store::open(&dir.path().join("state.redb")).expect("open a version 1 state");
    assert_eq!(store.check_indexes().expect("check"), None);
    assert_eq!(store.count("builds").expect("count"), 6);
    assert_eq!(store.count(&index_key("builder", "app/build")).expect("count"), 3);
    assert_eq!(store.count(&index_key("result", "FAILURE")).expect("count"), 2);
    assert_eq!(store.count("changes").expect("count"), 1);
    let mut ids = Vec::new();
    store
        .scan_builds(Some(&index_key("builder", "app/lint")), true, |b| {
            ids.push((b.id, b.result.map(|r| r.to_string())));
            true
        })
        .expect("scan");
    assert_eq!(ids, vec![(6, Some("FAILURE".to_owned())), (2, Some("FAILURE".to_owned()))]);
    let b = store.build(1).expect("read").expect("build 1");
    assert_eq!(b.steps.len(), 2);
    assert!(b.steps[0].log_id.is_some());
    drop(store);
    // Opened again: already version 2, nothing to do, same answers.
    let store = Store::open(&dir.path().join("state.redb")).expect("reopen");
    assert_eq!(store.count("builds").expect("count"), 6);
    assert_eq!(store.check_indexes().expect("check"), None);
}

#[test]
fn after_a_kill_9_under_load_indexes_and_counts_match_the_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  a:\n    steps: [{ run: 'true' }, { run: 'echo hi' }]\n  b:\n    steps: [{ run: 'exit 1' }]\n",
        &[],
    );
    let config = write_config(dir.path(), &["app"], &[("w1", "t", &[]), ("w2", "t", &[])]);
    let state = dir.path().join("state");
    let mut m = Master::start(&config, &state);
    let _w1 = Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let _w2 = Worker::start(&m, "w2", "t", &dir.path().join("w2"), &[]);
    let mut last = 0;
    for i in 0..40 {
        last = m.force(if i % 3 == 0 { "app/b" } else { "app/a" });
    }
    // Killed while builds are still running and queued.
    wait_for(Duration::from_secs(60), "some builds to finish", || {
        (m.get("/api/v2/builds?state=finished&limit=1").json()["meta"]["total"].as_u64()? >= 5).then_some(())
    });
    m.kill();
    let store = Store::open(&state.join("state.redb")).expect("open after kill -9");
    assert_eq!(store.check_indexes().expect("check"), None);
    assert!(store.build(last).expect("read").is_some(), "an acknowledged force was lost");
}
