//! Cron schedules against a real engine and redb file, with the clock in the test's hands:
//! a schedule fires once per matching minute, not again after a restart, and a minute missed
//! while the master was down fires exactly once when it comes back.

mod support;

use rbb_master::server::{MasterOptions, open};
use std::time::Duration;
use support::*;

/// 2026-11-24T10:00:00Z.
const TEN: i64 = 1_795_514_400;

fn options(dir: &std::path::Path) -> MasterOptions {
    MasterOptions {
        config: dir.join("rbb.yaml"),
        state_dir: Some(dir.join("state")),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: "127.0.0.1:0".parse().expect("addr"),
        heartbeat: Duration::from_secs(1),
        migrate: false,
        standby: false,
    }
}

#[test]
fn a_schedule_fires_once_per_minute_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  nightly:\n    on:\n      schedule: [{ cron: \"*/5 * * * *\", only_if_changed: false }]\n    steps: [{ run: echo nightly }]\n",
        &[],
    );
    std::fs::write(
        dir.path().join("rbb.yaml"),
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n",
    )
    .expect("config");
    let opts = options(dir.path());
    let count = |m: &rbb_master::server::Master| m.engine.builds_of("app/nightly", 1000).expect("builds").len();

    let m = open(&opts).expect("master");
    assert!(m.engine.cron_tick(TEN + 4 * 60 + 30).expect("tick").is_empty(), "10:04:30 is not due");
    assert_eq!(m.engine.cron_tick(TEN + 5 * 60 + 10).expect("tick").len(), 1, "10:05 fires");
    assert!(m.engine.cron_tick(TEN + 5 * 60 + 50).expect("tick").is_empty(), "10:05 fires once");
    assert_eq!(count(&m), 1);
    drop(m);

    // Restarted within the same minute: it already fired.
    let m = open(&opts).expect("master after a restart");
    assert!(m.engine.cron_tick(TEN + 5 * 60 + 55).expect("tick").is_empty(), "no second firing after a restart");
    assert_eq!(count(&m), 1);
    drop(m);

    // Down across 10:10, back at 10:11:20: the missed firing happens once.
    let m = open(&opts).expect("master after downtime");
    let fired = m.engine.cron_tick(TEN + 11 * 60 + 20).expect("tick");
    assert_eq!(fired.len(), 1, "the missed 10:10 firing happens once");
    assert!(m.engine.cron_tick(TEN + 11 * 60 + 40).expect("tick").is_empty());
    assert_eq!(count(&m), 2);
    let b = m.engine.build(fired[0]).expect("build");
    assert!(b.reason.contains("schedule \"*/5 * * * *\""), "{}", b.reason);
    drop(m);

    // A long outage fires only the newest missed minute, not one build per missed minute.
    let m = open(&opts).expect("master after a long outage");
    assert_eq!(m.engine.cron_tick(TEN + 3 * 3600).expect("tick").len(), 1);
    assert_eq!(count(&m), 3);
}
