//! The restart sweep against real processes: it kills a recorded step group, and never a
//! process that merely reuses a recorded number.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use rbb_worker::guard::{Swept, start_time, sweep};

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_owned()
}

#[test]
fn the_sweep_kills_recorded_groups_and_nothing_else() {
    let scratch = tempfile::tempdir().unwrap();
    let steps = scratch.path().join("steps");
    std::fs::create_dir_all(&steps).unwrap();
    let mut child = Command::new("sleep").arg("30").process_group(0).spawn().unwrap();
    let pgid = i32::try_from(child.id()).unwrap();
    let start = start_time(pgid).unwrap();
    let boot = boot_id();
    let record = |text: String| std::fs::write(steps.join(pgid.to_string()), text).unwrap();
    let alive = |child: &mut std::process::Child| child.try_wait().unwrap().is_none();

    // The number now belongs to a process that started at another time: left alone.
    record(format!("{pgid} {} {boot}\n", start + 1));
    assert_eq!(sweep(&steps).unwrap(), [Swept::Reused(pgid)]);
    assert!(alive(&mut child));
    // A record from another boot says nothing about this boot's processes.
    record(format!("{pgid} {start} 00000000-0000-0000-0000-000000000000\n"));
    assert_eq!(sweep(&steps).unwrap(), [Swept::Reused(pgid)]);
    assert!(alive(&mut child));
    // Garbage is removed, nothing killed.
    record("not a record".to_owned());
    assert_eq!(sweep(&steps).unwrap(), []);
    assert!(alive(&mut child));
    assert_eq!(std::fs::read_dir(&steps).unwrap().count(), 0);

    // The real thing: killed, record removed.
    record(format!("{pgid} {start} {boot}\n"));
    assert_eq!(sweep(&steps).unwrap(), [Swept::Killed(pgid)]);
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    assert_eq!(std::fs::read_dir(&steps).unwrap().count(), 0);

    // Once the group is gone, its record only goes away.
    record(format!("{pgid} {start} {boot}\n"));
    assert_eq!(sweep(&steps).unwrap(), [Swept::Gone(pgid)]);
}
