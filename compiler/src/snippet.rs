//! Python snippets: the [`Evaluator`] trait the compiler core calls, and the evaluator that
//! runs snippets in a child process (`rbb-snippet`) under hard limits.
//!
//! A snippet is the body of `def snippet(ctx): ...` and returns plain data (dicts, lists,
//! strings, numbers, booleans, None); what it prints is captured and comes back with the
//! result. The child applies `RLIMIT_AS` and `RLIMIT_CPU` to itself; this side enforces the
//! wall clock by killing the child, and reads how it died from its exit status and the last
//! lines of its stderr: a stack overflow or a panic inside the interpreter is a crash, an
//! aborted allocation is "out of memory". One child serves many snippets in turn and is
//! replaced after any failure that may have left it in a bad state, so one snippet's crash
//! never stops the next snippet.
//!
//! This module never interprets Python itself: that happens only in the child binary.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the runner may take to start its interpreter.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// Limits for one snippet.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub wall: Duration,
    pub memory_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { wall: Duration::from_secs(5), memory_mib: 512 }
    }
}

/// One request to the child: JSON on one line of its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub code: String,
    pub ctx: serde_json::Value,
}

/// The child's answer: JSON on one line of its stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<SnippetError>,
    /// What the snippet printed (`print()`, writes to `sys.stdout`/`sys.stderr`), cut at
    /// [`OUTPUT_LIMIT`] characters.
    #[serde(default)]
    pub output: String,
}

/// Most characters of a snippet's printed output that are kept.
pub const OUTPUT_LIMIT: usize = 8192;

/// What evaluating one snippet gave: its value or why not, and what it printed.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub result: Result<serde_json::Value, SnippetError>,
    pub output: String,
}

impl Evaluation {
    pub fn failed(error: SnippetError) -> Evaluation {
        Evaluation { result: Err(error), output: String::new() }
    }
}

/// Why a snippet produced no value. Lines and columns are 1-based within the snippet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SnippetError {
    /// The code does not parse.
    Syntax { line: u32, col: u32, message: String },
    /// The code raised; `line` is where, if known.
    Raised { line: Option<u32>, exception: String, message: String },
    /// It tried something the sandbox forbids (an import outside the allow-list, `open`).
    Forbidden { line: Option<u32>, message: String },
    /// It returned something that is not plain data.
    BadResult { message: String },
    /// It ran past the wall-clock limit and was killed.
    Timeout { limit_ms: u64 },
    /// It ran out of memory (the child died allocating).
    OutOfMemory { limit_mib: u64 },
    /// It crashed the interpreter (a stack overflow, or a fault inside RustPython); `message`
    /// says which.
    Crashed { message: String },
    /// The snippet runner could not be started or crashed for another reason.
    Runner { message: String },
}

/// Evaluates snippets. The compiler core only knows this trait. Files are compiled on
/// several threads, so an evaluator is shared between them.
pub trait Evaluator: Sync {
    fn eval(&self, code: &str, ctx: &serde_json::Value) -> Evaluation;
}

/// An evaluator for pipelines that must not contain snippets (every call fails).
#[derive(Debug, Default)]
pub struct NoSnippets;

impl Evaluator for NoSnippets {
    fn eval(&self, _: &str, _: &serde_json::Value) -> Evaluation {
        Evaluation::failed(SnippetError::Runner { message: "Python snippets are disabled here".to_owned() })
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// The last lines the child wrote to stderr (where Rust reports a panic, a stack
    /// overflow or a failed allocation before the process dies).
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    next_id: u64,
}

/// How many stderr lines of the child are kept.
const STDERR_LINES: usize = 16;

impl Running {
    /// Waits for the child to exit and returns its status with the end of its stderr.
    fn reap(&mut self) -> (Option<std::process::ExitStatus>, String) {
        let status = self.child.wait().ok();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect::<Vec<_>>();
        (status, tail.join("\n"))
    }
}

/// Runs snippets in `rbb-snippet` child processes.
pub struct ChildEvaluator {
    program: PathBuf,
    args: Vec<String>,
    /// The child's whole environment (it starts from an empty one).
    env: Vec<(String, String)>,
    limits: Limits,
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for ChildEvaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildEvaluator").field("program", &self.program).field("limits", &self.limits).finish()
    }
}

impl ChildEvaluator {
    pub fn new(program: impl Into<PathBuf>, limits: Limits) -> ChildEvaluator {
        ChildEvaluator { program: program.into(), args: Vec::new(), env: Vec::new(), limits, running: Mutex::new(None) }
    }

    /// Runs the current executable with `args` as the runner (for programs that embed
    /// [`crate::runner`], like `rbb snippet-runner`).
    pub fn current_exe_with(args: &[&str], limits: Limits) -> ChildEvaluator {
        let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("rbb"));
        ChildEvaluator {
            program,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            limits,
            running: Mutex::new(None),
        }
    }

    /// Adds an argument before the runner's own (e.g. `snippet-runner` for `rbb`).
    pub fn arg(mut self, arg: &str) -> ChildEvaluator {
        self.args.push(arg.to_owned());
        self
    }

    /// Sets a variable in the runner's (otherwise empty) environment.
    pub fn env(mut self, key: &str, value: &str) -> ChildEvaluator {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn spawn(&self) -> Result<Running, SnippetError> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .arg("--memory-mib")
            .arg(self.limits.memory_mib.to_string())
            .arg("--cpu-secs")
            .arg((self.limits.wall.as_secs() + 2).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .map_err(|e| SnippetError::Runner {
                message: format!("cannot start snippet runner {}: {e}", self.program.display()),
            })?;
        let stdin = child.stdin.take().ok_or_else(|| SnippetError::Runner { message: "no stdin".into() })?;
        let stdout = child.stdout.take().ok_or_else(|| SnippetError::Runner { message: "no stdout".into() })?;
        let stderr_pipe = child.stderr.take().ok_or_else(|| SnippetError::Runner { message: "no stderr".into() })?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            // Read to the end whatever it is, so the child never blocks on a full pipe.
            for line in BufReader::new(stderr_pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == STDERR_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Running { child, stdin, lines: rx, stderr, stderr_reader: Some(stderr_reader), next_id: 1 };
        // Interpreter start-up is not the snippet's time: wait for the ready line first.
        match running.lines.recv_timeout(STARTUP_LIMIT) {
            Ok(line) if line.contains("\"ready\"") => Ok(running),
            Ok(line) => Err(SnippetError::Runner { message: format!("snippet runner said `{line}` instead of ready") }),
            Err(RecvTimeoutError::Timeout) => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                Err(SnippetError::Runner {
                    message: format!("snippet runner did not start within {}s", STARTUP_LIMIT.as_secs()),
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                let (status, stderr) = running.reap();
                Err(SnippetError::Runner {
                    message: format!(
                        "snippet runner {} exited at start ({}){}",
                        self.program.display(),
                        status.map(|s| s.to_string()).unwrap_or_default(),
                        if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
                    ),
                })
            }
        }
    }
}

impl Evaluator for ChildEvaluator {
    fn eval(&self, code: &str, ctx: &serde_json::Value) -> Evaluation {
        let mut guard = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            match self.spawn() {
                Ok(running) => *guard = Some(running),
                Err(e) => return Evaluation::failed(e),
            }
        }
        let Some(running) = guard.as_mut() else {
            return Evaluation::failed(SnippetError::Runner { message: "snippet runner unavailable".into() });
        };
        let id = running.next_id;
        running.next_id += 1;
        let request = Request { id, code: code.to_owned(), ctx: ctx.clone() };
        let mut line = match serde_json::to_string(&request) {
            Ok(line) => line,
            Err(e) => return Evaluation::failed(SnippetError::Runner { message: e.to_string() }),
        };
        line.push('\n');
        let write = running.stdin.write_all(line.as_bytes()).and_then(|()| running.stdin.flush());
        let outcome = match write {
            // The child died before reading: find out how.
            Err(_) => {
                let _ = running.child.kill();
                let (status, stderr) = running.reap();
                Evaluation::failed(died(status, &stderr, self.limits))
            }
            Ok(()) => wait_for(running, id, self.limits),
        };
        if let Err(err) = &outcome.result
            && matches!(
                err,
                SnippetError::Timeout { .. }
                    | SnippetError::OutOfMemory { .. }
                    | SnippetError::Crashed { .. }
                    | SnippetError::Runner { .. }
            )
            && let Some(mut dead) = guard.take()
        {
            // The next snippet gets a fresh runner.
            let _ = dead.child.kill();
            let _ = dead.reap();
        }
        outcome
    }
}

fn wait_for(running: &mut Running, id: u64, limits: Limits) -> Evaluation {
    loop {
        match running.lines.recv_timeout(limits.wall) {
            Ok(line) => {
                let Ok(resp) = serde_json::from_str::<Response>(&line) else {
                    continue;
                };
                if resp.id != id {
                    continue;
                }
                let result = match (resp.value, resp.error) {
                    (_, Some(err)) => Err(err),
                    (Some(v), None) => Ok(v),
                    (None, None) => Ok(serde_json::Value::Null),
                };
                return Evaluation { result, output: resp.output };
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = running.child.kill();
                return Evaluation::failed(SnippetError::Timeout { limit_ms: limits.wall.as_millis() as u64 });
            }
            Err(RecvTimeoutError::Disconnected) => {
                let (status, stderr) = running.reap();
                return Evaluation::failed(died(status, &stderr, limits));
            }
        }
    }
}

/// Why the runner died, from its exit status and the end of its stderr.
fn died(status: Option<std::process::ExitStatus>, stderr: &str, limits: Limits) -> SnippetError {
    use std::os::unix::process::ExitStatusExt;
    if stderr.contains("has overflowed its stack") {
        return SnippetError::Crashed { message: "stack overflow: deep recursion".to_owned() };
    }
    if let Some(panic) = stderr.lines().skip_while(|l| !l.contains("panicked at")).nth(1) {
        return SnippetError::Crashed { message: format!("a fault inside RustPython: {}", panic.trim()) };
    }
    match status.and_then(|s| s.signal()) {
        // An allocation past RLIMIT_AS aborts (SIGABRT); the kernel may also SIGKILL/SIGSEGV.
        Some(libc::SIGABRT) | Some(libc::SIGKILL) | Some(libc::SIGSEGV) | Some(libc::SIGBUS) => {
            SnippetError::OutOfMemory { limit_mib: limits.memory_mib }
        }
        Some(libc::SIGXCPU) => SnippetError::Timeout { limit_ms: limits.wall.as_millis() as u64 },
        _ => SnippetError::Runner {
            message: format!(
                "snippet runner exited unexpectedly ({}){}",
                status.map(|s| s.to_string()).unwrap_or_else(|| "unknown status".into()),
                if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
            ),
        },
    }
}

impl Drop for ChildEvaluator {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = running.child.kill();
            let _ = running.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signalled(signal: i32) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        Some(std::process::ExitStatus::from_raw(signal))
    }

    #[test]
    fn a_dead_runner_says_what_killed_it() {
        let limits = Limits::default();
        // What Rust writes before aborting on a native stack overflow: not "out of memory".
        let overflow =
            "\nthread '<unnamed>' (24446) has overflowed its stack\nfatal runtime error: stack overflow, aborting";
        assert_eq!(
            died(signalled(libc::SIGABRT), overflow, limits),
            SnippetError::Crashed { message: "stack overflow: deep recursion".into() }
        );
        let panic = "thread '<unnamed>' (1) panicked at src/builtins/type.rs:1400:25:\nstatic type name must be interned\nnote: run with `RUST_BACKTRACE=1`";
        assert_eq!(
            died(None, panic, limits),
            SnippetError::Crashed { message: "a fault inside RustPython: static type name must be interned".into() }
        );
        assert_eq!(
            died(signalled(libc::SIGABRT), "memory allocation of 67108864 bytes failed", limits),
            SnippetError::OutOfMemory { limit_mib: 512 }
        );
    }
}
