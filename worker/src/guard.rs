//! Steps die with their worker: every process a step starts (its command, the git commands
//! of its checkout) runs in a process group of its own ([`own_group`], [`ProcessGroup`]); a
//! guard process kills the groups still running when the worker disappears (even by
//! `kill -9`), keeping a record of them under the work directory; a restarted worker sweeps
//! what a dead one left behind.
//!
//! The worker starts the guard (its own binary, re-executed with [`GUARD_ARG`]) with one end
//! of a `SOCK_SEQPACKET` socket pair as its stdin. Each step's child registers its process
//! group on that socket itself, between `fork` and `exec` ([`GuardLink::register_in_child`]),
//! so no step can start unknown to the guard; the worker unregisters a group once it has
//! killed it. When every copy of the worker's end is closed the guard reads end-of-file,
//! kills the groups it still knows, removes their records and exits. The guard records each
//! group as a file `<workdir>/.rbb-worker/steps/<pgid>` naming the leader's start time and the
//! boot id, so that a later sweep never kills an unrelated process that reuses the number.
//! A lock on `<workdir>/.rbb-worker/lock`, held by the worker and its guard, keeps a second
//! worker off a work directory in use (and its sweep off the first worker's steps).
//!
//! This module knows processes and files only: nothing of the protocol, git or the master.
//! Linux only (`/proc`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// The first argument that makes `rbb-worker` run as a guard: `rbb-worker __rbb-guard <steps dir>`.
pub const GUARD_ARG: &str = "__rbb-guard";

/// The worker's own directory under its work directory. The master's checkout directory names
/// always hold a `_` (from the `/` of `repo/builder`); a lease naming this one is refused.
pub const STATE_DIR: &str = ".rbb-worker";

/// How long a starting worker waits for the previous one (or its guard) to let go of the
/// work directory.
const LOCK_WAIT: Duration = Duration::from_secs(10);
const LOCK_POLL: Duration = Duration::from_millis(20);

/// Why the guard could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "the work directory {} is in use by another rbb-worker (its lock {} is still held after {}s)",
        workdir.display(), lock.display(), LOCK_WAIT.as_secs()
    )]
    InUse { workdir: PathBuf, lock: PathBuf },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the guard process ({}): {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The worker's side of its guard: the lock on the work directory, the socket to the guard
/// and the guard's process. Dropping it closes the socket; the guard then exits (after
/// killing whatever is still registered).
#[derive(Debug)]
pub struct Guard {
    link: Arc<GuardLink>,
    child: Child,
    _lock: File,
}

/// The worker's end of the socket to the guard, shared by every step.
#[derive(Debug)]
pub struct GuardLink {
    socket: OwnedFd,
    /// Set once the guard is found gone, so that is said once.
    lost: AtomicBool,
}

/// What the sweep did with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swept {
    /// The group still had processes; they were killed.
    Killed(i32),
    /// Nothing of the group was left.
    Gone(i32),
    /// The number now belongs to another process (a different start time or boot): left alone.
    Reused(i32),
}

impl Guard {
    /// Locks `<workdir>/.rbb-worker` (waiting a little for a previous worker's guard to
    /// finish), kills what an earlier run left behind, then starts the guard as `exe
    /// __rbb-guard <dir>`. `exe` must be a binary that dispatches [`GUARD_ARG`] to [`serve`]
    /// (on Linux, `/proc/self/exe` of `rbb-worker`).
    pub fn start(workdir: &Path, exe: &Path) -> Result<(Guard, Vec<Swept>), GuardError> {
        let steps = steps_dir(workdir);
        std::fs::create_dir_all(&steps).map_err(|source| GuardError::Io {
            action: "create",
            path: steps.clone(),
            source,
        })?;
        let lock_path = workdir.join(STATE_DIR).join("lock");
        let lock = lock_workdir(workdir, &lock_path)?;
        let swept = sweep(&steps).map_err(|source| GuardError::Io { action: "sweep", path: steps.clone(), source })?;
        for s in &swept {
            match s {
                Swept::Killed(pgid) => warn!(pgid, "killed the steps of an earlier run of this worker"),
                Swept::Gone(pgid) | Swept::Reused(pgid) => debug!(pgid, "stale step record removed"),
            }
        }

        let (ours, theirs) = seqpacket_pair().map_err(|source| GuardError::Io {
            action: "create a socket pair for",
            path: steps.clone(),
            source,
        })?;
        let lock_fd = lock.as_raw_fd();
        let mut command = Command::new(exe);
        command
            .arg(GUARD_ARG)
            .arg(&steps)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group: a ctrl-c in the terminal or a signal to the worker's group must not
            // take the guard with it.
            .process_group(0);
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // The guard holds the lock too (fd 3), so it outlives a killed worker.
                if lock_fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(lock_fd, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| GuardError::Spawn { exe: exe.to_owned(), source })?;
        debug!(pid = child.id(), "guard started");
        let link = GuardLink { socket: ours, lost: AtomicBool::new(false) };
        Ok((Guard { link: Arc::new(link), child, _lock: lock }, swept))
    }

    /// The link steps register through.
    pub fn link(&self) -> Arc<GuardLink> {
        Arc::clone(&self.link)
    }

    /// The guard's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl GuardLink {
    /// The socket to hand to [`GuardLink::register_in_child`].
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Registers the calling process as the leader of a step's process group. Meant for a
    /// `pre_exec` hook: it allocates nothing and makes only async-signal-safe calls. A guard
    /// that is gone is not an error (the step still runs).
    ///
    /// # Safety
    /// `fd` must be the socket of a live [`GuardLink`] (inherited across `fork`).
    pub unsafe fn register_in_child(fd: RawFd) {
        let mut msg = [0u8; 48];
        msg[0] = b'+';
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        let mut len = 1 + write_decimal(&mut msg[1..], u64::try_from(pid).unwrap_or(0));
        msg[len] = b' ';
        len += 1;
        // SAFETY: reads our own stat file into a stack buffer.
        let start = unsafe { own_start_time() };
        len += write_decimal(&mut msg[len..], start);
        // SAFETY: a send on an inherited socket from a stack buffer; MSG_NOSIGNAL because the
        // child's SIGPIPE disposition is already reset to the default here.
        let _ = unsafe { send_all(fd, &msg[..len]) };
    }

    /// The worker has killed group `pgid`: the guard forgets it.
    pub fn release(&self, pgid: i32) {
        let msg = format!("-{pgid}");
        // SAFETY: a send on our own socket from a live buffer.
        if unsafe { send_all(self.socket.as_raw_fd(), msg.as_bytes()) }.is_err()
            && !self.lost.swap(true, Ordering::Relaxed)
        {
            warn!("the guard process is gone: steps will not be stopped if this worker is killed");
        }
    }
}

/// Makes `command` start in a new process group of its own (its id is the child's pid) and,
/// with a guard, registers that group from the child before it runs anything.
pub fn own_group(command: &mut tokio::process::Command, guard: Option<&Arc<GuardLink>>) {
    command.process_group(0);
    if let Some(guard) = guard {
        let fd = guard.raw_fd();
        // SAFETY: the hook runs after `setpgid` and only makes async-signal-safe calls; `fd`
        // stays open as long as the guard link lives, which outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                GuardLink::register_in_child(fd);
                Ok(())
            });
        }
    }
}

/// A process group a step owns: SIGKILLed when dropped (e.g. when the step's future is
/// dropped mid-run) unless already killed, and then released from the guard.
#[derive(Debug)]
pub struct ProcessGroup {
    pgid: libc::pid_t,
    armed: bool,
    guard: Option<Arc<GuardLink>>,
}

impl ProcessGroup {
    /// The group `pgid`, started with [`own_group`] and the same `guard`.
    pub fn new(pgid: libc::pid_t, guard: Option<Arc<GuardLink>>) -> ProcessGroup {
        ProcessGroup { pgid, armed: true, guard }
    }

    pub fn pgid(&self) -> libc::pid_t {
        self.pgid
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: killpg has no memory-safety preconditions; a stale group only yields ESRCH.
        let rc = unsafe { libc::killpg(self.pgid, signal) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // ESRCH: the whole group is already gone, the usual case after a clean exit.
            if err.raw_os_error() != Some(libc::ESRCH) {
                warn!(pgid = self.pgid, signal, %err, "cannot signal a step's process group");
            }
        }
    }

    /// SIGKILL whatever is left of the group and stop owning it.
    pub fn kill_and_forget(&mut self) {
        if self.armed {
            self.signal(libc::SIGKILL);
            self.armed = false;
            if let Some(guard) = &self.guard {
                guard.release(self.pgid);
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill_and_forget();
    }
}

/// Where the step records of the worker using `workdir` live.
pub fn steps_dir(workdir: &Path) -> PathBuf {
    workdir.join(STATE_DIR).join("steps")
}

fn lock_workdir(workdir: &Path, lock_path: &Path) -> Result<File, GuardError> {
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path)
        .map_err(|source| GuardError::Io { action: "open", path: lock_path.to_owned(), source })?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a file we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(lock);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) && err.kind() != std::io::ErrorKind::Interrupted {
            return Err(GuardError::Io { action: "lock", path: lock_path.to_owned(), source: err });
        }
        if Instant::now() >= deadline {
            return Err(GuardError::InUse { workdir: workdir.to_owned(), lock: lock_path.to_owned() });
        }
        // A previous worker's guard is still killing its steps: it lets go within moments.
        std::thread::sleep(LOCK_POLL);
    }
}

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into the array on success.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// # Safety
/// `fd` must be an open socket.
unsafe fn send_all(fd: RawFd, msg: &[u8]) -> std::io::Result<()> {
    loop {
        // SAFETY: `msg` is valid for its length.
        let n = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes `value` in decimal at the start of `buf`; returns the length (0 if it does not fit).
fn write_decimal(buf: &mut [u8], mut value: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (value % 10) as u8;
        n += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    if n > buf.len() {
        return 0;
    }
    for i in 0..n {
        buf[i] = digits[n - 1 - i];
    }
    n
}

/// The calling process's start time (field 22 of `/proc/self/stat`, clock ticks after boot),
/// 0 when unknown. Allocation-free, for use between fork and exec.
///
/// # Safety
/// Makes raw system calls only; safe to call anywhere, `unsafe` for the `pre_exec` contract.
unsafe fn own_start_time() -> u64 {
    let mut buf = [0u8; 1024];
    // SAFETY: a NUL-terminated path and a stack buffer.
    let n = unsafe {
        let fd = libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let Ok(n) = usize::try_from(n) else { return 0 };
    stat_start_time(&buf[..n.min(buf.len())]).unwrap_or(0)
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn stat_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    // After `)`: field 3 (state) is the first token; field 22 is the 20th.
    let field = stat[close + 1..].split(|&b| b == b' ').filter(|t| !t.is_empty()).nth(19)?;
    let mut value: u64 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(value)
}

/// The start time of process `pid`, `None` if there is no such process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    stat_start_time(&stat)
}

/// This boot's id: start times only compare within one boot.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Kills group `pgid` if it is still the one whose leader started at `start` (0: unknown).
/// While any member of a group lives its number cannot be given to a new process, so a group
/// whose leader is gone is still ours; a leader with another start time means the number was
/// reused and the group is left alone.
fn kill_group(pgid: i32, start: u64) -> Swept {
    if pgid <= 1 {
        return Swept::Reused(pgid);
    }
    if let Some(now) = start_time(pgid)
        && start != 0
        && now != start
    {
        return Swept::Reused(pgid);
    }
    // SAFETY: killpg has no memory-safety preconditions.
    if unsafe { libc::killpg(pgid, libc::SIGKILL) } == 0 { Swept::Killed(pgid) } else { Swept::Gone(pgid) }
}

/// Kills the groups recorded in `steps` (by a worker and guard that are both gone) and
/// removes the records. Records from another boot are only removed.
pub fn sweep(steps: &Path) -> std::io::Result<Vec<Swept>> {
    let boot = boot_id();
    let mut swept = Vec::new();
    let entries = match std::fs::read_dir(steps) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(swept),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut fields = text.split_whitespace();
        let record = (fields.next().and_then(|p| p.parse::<i32>().ok()), fields.next().and_then(|s| s.parse().ok()));
        match (record, fields.next()) {
            ((Some(pgid), Some(start)), Some(recorded_boot)) if recorded_boot == boot => {
                swept.push(kill_group(pgid, start));
            }
            ((Some(pgid), _), _) => swept.push(Swept::Reused(pgid)),
            _ => debug!(path = %path.display(), "unreadable step record removed"),
        }
        if let Err(err) = std::fs::remove_file(&path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            return Err(err);
        }
    }
    Ok(swept)
}

/// The guard's side: reads registrations from stdin until end-of-file, keeping a record of
/// each group in `steps`; then kills what is still registered, removes the records and
/// returns. Runs in its own process (`rbb-worker __rbb-guard <steps>`), without a runtime.
pub fn serve(steps: &Path) -> std::io::Result<()> {
    let boot = boot_id();
    // SAFETY: fd 0 is the socket the worker gave us; it is owned by this function from now on.
    let mut input = unsafe { File::from_raw_fd(0) };
    let mut groups: std::collections::HashMap<i32, u64> = std::collections::HashMap::new();
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                warn!(%err, "reading from the worker failed; acting as if it were gone");
                break;
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        let (op, rest) = text.split_at(1.min(text.len()));
        let mut fields = rest.split_whitespace();
        let Some(pgid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
            warn!(message = %text, "unreadable message from the worker");
            continue;
        };
        let record = steps.join(pgid.to_string());
        match op {
            "+" => {
                let start = fields.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                groups.insert(pgid, start);
                if let Err(err) = std::fs::write(&record, format!("{pgid} {start} {boot}\n")) {
                    warn!(%err, path = %record.display(), "cannot record a step's process group");
                }
            }
            "-" => {
                groups.remove(&pgid);
                let _ = std::fs::remove_file(&record);
            }
            _ => warn!(message = %text, "unreadable message from the worker"),
        }
    }
    for (pgid, start) in groups {
        match kill_group(pgid, start) {
            Swept::Killed(pgid) => info!(pgid, "the worker is gone: killed its step's process group"),
            other => debug!(?other, "the worker is gone: step group already ended"),
        }
        let _ = std::fs::remove_file(steps.join(pgid.to_string()));
    }
    Ok(())
}

/// Whether `arg` (the binary's first argument) asks for guard mode.
pub fn is_guard_arg(arg: &OsStr) -> bool {
    arg == OsStr::new(GUARD_ARG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_after_the_last_parenthesis() {
        let line = b"4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(stat_start_time(line), Some(987_654));
        assert_eq!(stat_start_time(b"1 (x) S 1"), None);
        let own = start_time(i32::try_from(std::process::id()).unwrap()).unwrap();
        // SAFETY: no preconditions.
        assert_eq!(unsafe { own_start_time() }, own);
    }

    #[test]
    fn decimal() {
        let mut buf = [0u8; 20];
        let n = write_decimal(&mut buf, 0);
        assert_eq!(&buf[..n], b"0");
        let n = write_decimal(&mut buf, 1_234_567);
        assert_eq!(&buf[..n], b"1234567");
        assert_eq!(write_decimal(&mut buf[..2], 123), 0);
    }
}
