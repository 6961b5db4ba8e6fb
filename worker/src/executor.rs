//! Running one step's command: the [`Executor`] trait every way of running a step implements,
//! and [`NativeExecutor`], which runs it as `sh -c <command>` in its own process group.
//!
//! An executor turns a [`StepSpec`] into output chunks and a [`StepOutcome`]. A failing
//! command is data (a result), never an error. This module must not know about the protocol's
//! messages beyond the result code, about git, or about the master.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rbb_schema::proto::StepResult;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::guard::{GuardLink, ProcessGroup, own_group};

/// Largest output chunk an executor sends (the protocol's LogChunk limit).
pub const MAX_CHUNK: usize = 1024 * 1024;

/// How long a process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// After the process group is gone, how long a pipe may stay silent before it is abandoned
/// (a process that left the group can keep it open forever).
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// Shell command, run as `sh -c <command>`.
    pub command: String,
    /// Added to the worker's own environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (must exist).
    pub cwd: PathBuf,
    /// Wall-clock limit; `None` means no limit.
    pub timeout: Option<Duration>,
    /// Docker image; `None` (or empty) means run natively.
    pub image: Option<String>,
    /// How to run it in a container; ignored when `image` is `None`.
    pub container: ContainerOptions,
}

/// The container side of a step: what only a Docker executor reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerOptions {
    /// The build the step belongs to (a label on everything made for it).
    pub build: u64,
    /// The build's checkout on the host, mounted at [`crate::docker::WORKSPACE`]; `cwd` must lie inside it.
    pub checkout: PathBuf,
    /// Run in the build's long-lived container (made by its first such step) instead of a
    /// fresh container for this step alone.
    pub build_container: bool,
    /// This is the build's last step in that container: remove it afterwards.
    pub last_in_container: bool,
    /// Memory limit in bytes (swap included); 0 means none.
    pub memory_bytes: u64,
    /// CPU limit in thousandths of a CPU; 0 means none.
    pub cpus_milli: u32,
    /// Docker network mode (`none`, `host`, `bridge`); empty means the engine's default.
    pub network: String,
    /// `uid[:gid]` or a user name of the image; empty means the worker's own uid:gid.
    pub user: String,
    /// Host paths mounted read-only; each must lie under a path the worker allows.
    pub mounts: Vec<MountSpec>,
    /// Platform the image must run on (`linux/arm64`); empty means the engine's own.
    pub platform: String,
    /// The build's services: started before its first container step, on a network of the
    /// build's own that its containers join; removed when the build ends.
    pub services: Vec<ServiceSpec>,
}

/// A host path mounted read-only into a step's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: String,
    pub target: String,
}

/// A service container of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Its host name on the build's network.
    pub name: String,
    pub image: String,
    pub env: BTreeMap<String, String>,
    /// Run by `sh -c` instead of the image's command.
    pub command: Option<String>,
    pub health: Option<HealthSpec>,
}

/// A service's readiness check, run by `sh -c` in its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub command: String,
    pub interval: Duration,
    pub retries: u32,
    pub timeout: Duration,
}

/// One chunk of a step's output, at most [`MAX_CHUNK`] bytes, never split on lines and never
/// assumed to be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Lines the worker writes itself (checkout progress, the command, the exit status).
    Header(Vec<u8>),
}

impl Output {
    /// The bytes of the chunk, whatever its stream.
    pub fn data(&self) -> &[u8] {
        match self {
            Output::Stdout(d) | Output::Stderr(d) | Output::Header(d) => d,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub result: StepResult,
    /// Exit code, when the command exited by itself.
    pub exit_code: Option<i32>,
    /// Human-readable reason for anything but SUCCESS; empty on SUCCESS.
    pub reason: String,
    pub duration: Duration,
    /// Digest of the image the step ran in (`sha256:…`); empty for native steps.
    pub image_digest: String,
}

impl StepOutcome {
    /// An EXCEPTION outcome: the step could not be run at all.
    pub fn exception(reason: impl Into<String>, duration: Duration) -> StepOutcome {
        StepOutcome {
            result: StepResult::Exception,
            exit_code: None,
            reason: reason.into(),
            duration,
            image_digest: String::new(),
        }
    }
}

/// A way of running a step. Implementations send output through `out` as it comes (the
/// channel is bounded: a slow receiver slows the step, memory does not grow), stop the step
/// when `cancel` fires (reporting CANCELLED), and never panic on a failing command.
pub trait Executor: Send + Sync {
    fn run(&self, spec: StepSpec, out: mpsc::Sender<Output>, cancel: CancellationToken) -> BoxFuture<'_, StepOutcome>;

    /// The digest (`sha256:…`) of `image` as a step of it would run, without running anything:
    /// part of the step's cache key. Empty for an executor that runs no images; `Err` says why
    /// the image cannot be resolved (the step would fail the same way).
    fn image_digest<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<String, String>>;

    /// The build's last step in its container did not run (it was reused from the cache):
    /// remove that container as running the step would have. Nothing to do without one.
    fn end_build_container(&self, build: u64) -> BoxFuture<'_, ()>;

    /// The platform of the images this executor runs (`linux/amd64`), offered to the master;
    /// `None` when it runs no images.
    fn image_platform(&self) -> Option<String> {
        None
    }

    /// Host path prefixes a step's container may mount read-only, offered to the master.
    fn allowed_mounts(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Runs steps as local processes: `sh -c <command>` in a new process group, stdin null.
/// With a guard ([`NativeExecutor::guarded`]), every group is registered with it before the
/// command starts, so the steps die with the worker.
#[derive(Debug, Clone, Default)]
pub struct NativeExecutor {
    guard: Option<Arc<GuardLink>>,
}

impl NativeExecutor {
    /// Steps are stopped by the worker only: a killed worker leaves them running.
    pub fn new() -> NativeExecutor {
        NativeExecutor { guard: None }
    }

    /// Steps are registered with `guard`, which kills them if the worker dies.
    pub fn guarded(guard: Arc<GuardLink>) -> NativeExecutor {
        NativeExecutor { guard: Some(guard) }
    }
}

impl Executor for NativeExecutor {
    fn run(&self, spec: StepSpec, out: mpsc::Sender<Output>, cancel: CancellationToken) -> BoxFuture<'_, StepOutcome> {
        Box::pin(run_native(spec, out, cancel, self.guard.clone()))
    }

    fn image_digest<'a>(&'a self, _image: &'a str) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(std::future::ready(Ok(String::new())))
    }

    fn end_build_container(&self, _build: u64) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Formats a duration the way reasons show it: `60s`, `1.5s`.
pub fn format_secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        let text = format!("{:.3}", d.as_secs_f64());
        format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Why the main process stopped.
enum Ending {
    Exited,
    TimedOut(Duration),
    Cancelled,
}

async fn run_native(
    spec: StepSpec,
    out: mpsc::Sender<Output>,
    cancel: CancellationToken,
    guard: Option<Arc<GuardLink>>,
) -> StepOutcome {
    let start = Instant::now();
    if spec.image.as_deref().is_some_and(|image| !image.is_empty()) {
        return StepOutcome::exception("this worker has no Docker executor", start.elapsed());
    }
    if cancel.is_cancelled() {
        return cancelled(start.elapsed());
    }

    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&spec.command)
        .current_dir(&spec.cwd)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    own_group(&mut command, guard.as_ref());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return StepOutcome::exception(
                format!("cannot start `sh -c` in {}: {err}", spec.cwd.display()),
                start.elapsed(),
            );
        }
    };
    let (Some(pid), Some(stdout), Some(stderr)) = (child.id(), child.stdout.take(), child.stderr.take()) else {
        // Cannot happen with piped stdio and a fresh child; report rather than panic.
        return StepOutcome::exception("spawned process has no pid or pipes", start.elapsed());
    };
    // Bigger pipes mean fewer, bigger chunks when a step writes fast (a 50 MB log is 50
    // messages, not 800). The kernel may refuse; the default 64 KiB then applies.
    widen_pipe(&stdout);
    widen_pipe(&stderr);
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return StepOutcome::exception(format!("pid {pid} out of range"), start.elapsed());
    };
    let mut group = ProcessGroup::new(pgid, guard);
    debug!(pgid, command = %spec.command, "step process started");

    // Set once the whole group has been killed: from then on, pipes only drain.
    let closing = CancellationToken::new();
    let waiter = async {
        let (ending, status) = tokio::select! {
            status = child.wait() => (Ending::Exited, status),
            () = sleep_opt(spec.timeout) => {
                let limit = spec.timeout.unwrap_or_default();
                (Ending::TimedOut(limit), terminate(&mut child, &group).await)
            }
            () = cancel.cancelled() => (Ending::Cancelled, terminate(&mut child, &group).await),
        };
        // Background children may still hold the pipes: nothing of the group outlives the step.
        group.kill_and_forget();
        closing.cancel();
        (ending, status)
    };
    let pumps = async {
        tokio::join!(pump(stdout, &out, Output::Stdout, &closing), pump(stderr, &out, Output::Stderr, &closing),)
    };
    let ((ending, status), _) = tokio::join!(waiter, pumps);
    let duration = start.elapsed();

    match ending {
        Ending::Cancelled => cancelled(duration),
        Ending::TimedOut(limit) => StepOutcome {
            result: StepResult::Failure,
            exit_code: None,
            reason: format!("timed out after {}", format_secs(limit)),
            duration,
            image_digest: String::new(),
        },
        Ending::Exited => match status {
            Ok(status) => exited(status, duration),
            Err(err) => StepOutcome::exception(format!("waiting for the process: {err}"), duration),
        },
    }
}

fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure leaves the pipe as it was.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, MAX_CHUNK as libc::c_int);
    }
}

pub(crate) fn cancelled(duration: Duration) -> StepOutcome {
    StepOutcome {
        result: StepResult::Cancelled,
        exit_code: None,
        reason: "cancelled".to_owned(),
        duration,
        image_digest: String::new(),
    }
}

fn exited(status: ExitStatus, duration: Duration) -> StepOutcome {
    match (status.code(), status.signal()) {
        (Some(0), _) => StepOutcome {
            result: StepResult::Success,
            exit_code: Some(0),
            reason: String::new(),
            duration,
            image_digest: String::new(),
        },
        (Some(code), _) => StepOutcome {
            result: StepResult::Failure,
            exit_code: Some(code),
            reason: format!("exit code {code}"),
            duration,
            image_digest: String::new(),
        },
        (None, Some(signal)) => StepOutcome {
            result: StepResult::Failure,
            exit_code: None,
            reason: format!("killed by signal {signal}"),
            duration,
            image_digest: String::new(),
        },
        (None, None) => StepOutcome {
            result: StepResult::Failure,
            exit_code: None,
            reason: format!("ended with {status}"),
            duration,
            image_digest: String::new(),
        },
    }
}

async fn sleep_opt(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM the group, give the main process [`KILL_GRACE`] to exit, then SIGKILL it.
async fn terminate(child: &mut Child, group: &ProcessGroup) -> std::io::Result<ExitStatus> {
    group.signal(libc::SIGTERM);
    match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            debug!(pgid = group.pgid(), "still alive after the grace period; SIGKILL");
            group.signal(libc::SIGKILL);
            child.wait().await
        }
    }
}

/// Copies one pipe to `out` in chunks of at most [`MAX_CHUNK`] bytes until EOF. Once
/// `closing` fires, a pipe silent for [`DRAIN_IDLE`] is abandoned. If the receiver is gone
/// the output is read and dropped, so the process never blocks on a full pipe.
async fn pump<R: AsyncRead + Unpin>(
    mut pipe: R,
    out: &mpsc::Sender<Output>,
    wrap: fn(Vec<u8>) -> Output,
    closing: &CancellationToken,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut receiver_gone = false;
    loop {
        let read = if closing.is_cancelled() {
            match tokio::time::timeout(DRAIN_IDLE, pipe.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => {
                    warn!("a process outside the step's group keeps its output open; abandoning it");
                    return;
                }
            }
        } else {
            // `read` is cancel-safe: on `closing` nothing is lost, the loop re-reads.
            tokio::select! {
                read = pipe.read(&mut buf) => read,
                () = closing.cancelled() => continue,
            }
        };
        match read {
            Ok(0) => return,
            Ok(n) => {
                if !receiver_gone && out.send(wrap(buf[..n].to_vec())).await.is_err() {
                    receiver_gone = true;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                warn!(%err, "reading the step's output failed");
                return;
            }
        }
    }
}
