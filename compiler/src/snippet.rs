//! Python snippets: the [`Evaluator`] trait the compiler core calls, and the evaluator that
//! runs snippets in a child process (`rbb-snippet`) under hard limits.
//!
//! A snippet is the body of `def snippet(ctx): ...` and returns plain data (dicts, lists,
//! strings, numbers, booleans, None). The child applies `RLIMIT_AS` and `RLIMIT_CPU` to
//! itself; this side enforces the wall clock by killing the child, and reads a crash (an
//! aborted allocation) as "out of memory". One child serves many snippets in turn and is
//! replaced after any failure that may have left it in a bad state.
//!
//! This module never interprets Python itself: that happens only in the child binary.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
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
    /// The snippet runner could not be started or crashed for another reason.
    Runner { message: String },
}

/// Evaluates snippets. The compiler core only knows this trait. Files are compiled on
/// several threads, so an evaluator is shared between them.
pub trait Evaluator: Sync {
    fn eval(&self, code: &str, ctx: &serde_json::Value) -> Result<serde_json::Value, SnippetError>;
}

/// An evaluator for pipelines that must not contain snippets (every call fails).
#[derive(Debug, Default)]
pub struct NoSnippets;

impl Evaluator for NoSnippets {
    fn eval(&self, _: &str, _: &serde_json::Value) -> Result<serde_json::Value, SnippetError> {
        Err(SnippetError::Runner { message: "Python snippets are disabled here".to_owned() })
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    next_id: u64,
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
            .stderr(Stdio::null())
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .map_err(|e| SnippetError::Runner {
                message: format!("cannot start snippet runner {}: {e}", self.program.display()),
            })?;
        let stdin = child.stdin.take().ok_or_else(|| SnippetError::Runner { message: "no stdin".into() })?;
        let stdout = child.stdout.take().ok_or_else(|| SnippetError::Runner { message: "no stdout".into() })?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Running { child, stdin, lines: rx, next_id: 1 };
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
                let status = running.child.wait().ok();
                Err(SnippetError::Runner {
                    message: format!(
                        "snippet runner {} exited at start ({})",
                        self.program.display(),
                        status.map(|s| s.to_string()).unwrap_or_default()
                    ),
                })
            }
        }
    }
}

impl Evaluator for ChildEvaluator {
    fn eval(&self, code: &str, ctx: &serde_json::Value) -> Result<serde_json::Value, SnippetError> {
        let mut guard = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.spawn()?);
        }
        let Some(running) = guard.as_mut() else {
            return Err(SnippetError::Runner { message: "snippet runner unavailable".into() });
        };
        let id = running.next_id;
        running.next_id += 1;
        let request = Request { id, code: code.to_owned(), ctx: ctx.clone() };
        let mut line = serde_json::to_string(&request).map_err(|e| SnippetError::Runner { message: e.to_string() })?;
        line.push('\n');
        let write = running.stdin.write_all(line.as_bytes()).and_then(|()| running.stdin.flush());
        let outcome = match write {
            Err(e) => Err(SnippetError::Runner { message: format!("snippet runner went away: {e}") }),
            Ok(()) => wait_for(running, id, self.limits),
        };
        if let Err(err) = &outcome
            && matches!(
                err,
                SnippetError::Timeout { .. } | SnippetError::OutOfMemory { .. } | SnippetError::Runner { .. }
            )
            && let Some(mut dead) = guard.take()
        {
            let _ = dead.child.kill();
            let _ = dead.child.wait();
        }
        outcome
    }
}

fn wait_for(running: &mut Running, id: u64, limits: Limits) -> Result<serde_json::Value, SnippetError> {
    loop {
        match running.lines.recv_timeout(limits.wall) {
            Ok(line) => {
                let Ok(resp) = serde_json::from_str::<Response>(&line) else {
                    continue;
                };
                if resp.id != id {
                    continue;
                }
                return match (resp.value, resp.error) {
                    (_, Some(err)) => Err(err),
                    (Some(v), None) => Ok(v),
                    (None, None) => Ok(serde_json::Value::Null),
                };
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = running.child.kill();
                return Err(SnippetError::Timeout { limit_ms: limits.wall.as_millis() as u64 });
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = running.child.wait().ok();
                return Err(died(status, limits));
            }
        }
    }
}

fn died(status: Option<std::process::ExitStatus>, limits: Limits) -> SnippetError {
    use std::os::unix::process::ExitStatusExt;
    match status.and_then(|s| s.signal()) {
        // An allocation past RLIMIT_AS aborts (SIGABRT); the kernel may also SIGKILL/SIGSEGV.
        Some(libc::SIGABRT) | Some(libc::SIGKILL) | Some(libc::SIGSEGV) | Some(libc::SIGBUS) => {
            SnippetError::OutOfMemory { limit_mib: limits.memory_mib }
        }
        Some(libc::SIGXCPU) => SnippetError::Timeout { limit_ms: limits.wall.as_millis() as u64 },
        _ => SnippetError::Runner {
            message: format!(
                "snippet runner exited unexpectedly ({})",
                status.map(|s| s.to_string()).unwrap_or_else(|| "unknown status".into())
            ),
        },
    }
}

impl Drop for ChildEvaluator {
    fn drop(&mut self) {
        if let Some(mut running) = self.running.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(running.stdin);
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}
