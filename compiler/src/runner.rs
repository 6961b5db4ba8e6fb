//! The snippet runner: the child process that evaluates pipeline Python snippets, one JSON
//! request per stdin line, one JSON response per stdout line (see [`crate::snippet`]).
//!
//! It caps its own address space and CPU time before starting the interpreter, and runs
//! RustPython built without host access (no files, sockets, processes or clock). Snippets run
//! with pruned builtins and an import allow-list so a forbidden call fails with a clear
//! message instead of a missing attribute. `print()` writes to a buffer that goes back with
//! the response. `sys` is reachable through allowed modules (`collections._sys`), so its
//! knobs that could hurt are disabled: the recursion limit cannot be raised (deep recursion
//! is a RecursionError) and no thread can be started through `sys.modules["_thread"]`;
//! should the interpreter still crash (a panic inside RustPython), the response says so and
//! this process exits, and the parent starts a fresh one for the next snippet. The wall clock
//! is enforced by the parent, which kills this process; nothing here tries to stop a runaway
//! snippet.

use crate::snippet::{OUTPUT_LIMIT, Request, Response, SnippetError};
use rustpython_vm::{PyObjectRef, VirtualMachine, py_serde};
use std::io::{BufRead, Write};

/// Runs one snippet and returns a plain dict: `{"value": ...}` or `{"error": {...}}`.
const DRIVER_SOURCE: &str = r##"
import builtins as _builtins
import sys as _sys

_ALLOWED = frozenset(["json", "re", "math", "itertools", "functools", "collections",
                      "string", "operator", "copy", "textwrap"])
_FORBIDDEN_BUILTINS = ("open", "input", "breakpoint", "help", "exit", "quit",
                       "exec", "eval", "compile", "globals", "locals", "vars", "memoryview")
_real_import = _builtins.__import__

class SandboxError(Exception):
    pass

def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    root = name.split(".")[0]
    from_snippet = isinstance(globals, dict) and globals.get("__name__") == "snippet"
    if from_snippet and (level != 0 or root not in _ALLOWED):
        raise SandboxError("import of `%s` is not allowed in a pipeline snippet (allowed: %s)"
                           % (name, ", ".join(sorted(_ALLOWED))))
    return _real_import(name, globals, locals, fromlist, level)

def _forbidden(name):
    def refuse(*args, **kwargs):
        raise SandboxError("`%s()` is not available in a pipeline snippet: snippets are pure functions of `ctx`" % name)
    return refuse

_safe = dict(_builtins.__dict__)
for _n in _FORBIDDEN_BUILTINS:
    _safe[_n] = _forbidden(_n)
_safe["__import__"] = _guarded_import
# The VM resolves `import` through the real builtins module, so guard it there too.
_builtins.__import__ = _guarded_import
# `sys` is one attribute away from allowed modules; its one knob that can crash the
# interpreter is the recursion limit (a native stack overflow instead of a RecursionError).
_sys.setrecursionlimit = _forbidden("sys.setrecursionlimit")
# `sys.modules` reaches `_thread`: a thread left running would outlive its snippet and
# spend the next snippets' time.
import _thread
_thread.start_new_thread = _forbidden("_thread.start_new_thread")
_thread.start_joinable_thread = _forbidden("_thread.start_joinable_thread")
del _thread

_OUTPUT_LIMIT = %OUTPUT_LIMIT%

class _Output:
    """Where `print()` goes while a snippet runs: kept, up to a limit, for the response."""
    def __init__(self):
        self.parts = []
        self.size = 0
    def write(self, text):
        text = str(text)
        room = _OUTPUT_LIMIT - self.size
        if room > 0:
            self.parts.append(text[:room])
        self.size += len(text)
        return len(text)
    def flush(self):
        pass
    def text(self):
        out = "".join(self.parts)
        if self.size > _OUTPUT_LIMIT:
            out += "\n… (%d more characters)" % (self.size - _OUTPUT_LIMIT)
        return out

def _snippet_line(tb):
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<snippet>":
            line = tb.tb_lineno - 1
        tb = tb.tb_next
    return line

def _check_plain(value, where, depth=0):
    if depth > 64:
        return "%s: nested too deeply" % where
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            err = _check_plain(item, "%s[%d]" % (where, i), depth + 1)
            if err:
                return err
        return None
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                return "%s: key %r is not a string" % (where, k)
            err = _check_plain(item, "%s.%s" % (where, k), depth + 1)
            if err:
                return err
        return None
    return "%s: a %s is not plain data (use dict, list, str, int, float, bool or None)" % (where, type(value).__name__)

def _unclosed_bracket(code):
    """(line, col, char) of the first bracket never closed, ignoring strings and comments."""
    stack = []
    line, col = 1, 1
    i, n = 0, len(code)
    while i < n:
        c = code[i]
        if c == "#":
            while i < n and code[i] != "\n":
                i += 1
            continue
        if c in "'\"":
            quote = code[i:i + 3] if code[i:i + 3] in ("'''", '"""') else c
            i += len(quote)
            col += len(quote)
            while i < n and code[i:i + len(quote)] != quote:
                if code[i] == "\\":
                    i += 1
                    col += 1
                if i < n and code[i] == "\n":
                    line += 1
                    col = 0
                i += 1
                col += 1
            i += len(quote)
            col += len(quote)
            continue
        if c in "([{":
            stack.append((line, col, c))
        elif c in ")]}" and stack:
            stack.pop()
        if c == "\n":
            line += 1
            col = 1
        else:
            col += 1
        i += 1
    return stack[0] if stack else None

def _run(code, ctx):
    output = _Output()
    _sys.stdout = output
    _sys.stderr = output
    try:
        result = _run_captured(code, ctx)
    finally:
        _sys.stdout = None
        _sys.stderr = None
    result["output"] = output.text()
    return result

def _run_captured(code, ctx):
    body = "\n".join("    " + line for line in code.split("\n"))
    wrapped = "def __snippet(ctx):\n" + body + "\n    return None\n"
    try:
        compiled = _builtins.compile(wrapped, "<snippet>", "exec")
    except SyntaxError as e:
        line = (e.lineno or 2) - 1
        col = max((e.offset or 5) - 4, 1)
        message = str(e.msg)
        last = len(code.rstrip("\n").split("\n"))
        if line > last:
            # The parser ran off the end: usually a bracket that is never closed.
            open_at = _unclosed_bracket(code)
            if open_at:
                line, col, message = open_at[0], open_at[1], "'%s' was never closed" % open_at[2]
            else:
                line, col = last, 1
        return {"error": {"kind": "syntax", "line": max(line, 1), "col": col, "message": message}}
    scope = {"__builtins__": _safe, "__name__": "snippet"}
    try:
        _builtins.exec(compiled, scope)
        value = scope["__snippet"](ctx)
    except SandboxError as e:
        return {"error": {"kind": "forbidden", "line": _snippet_line(e.__traceback__), "message": str(e)}}
    except MemoryError:
        return {"error": {"kind": "out_of_memory", "limit_mib": 0}}
    except BaseException as e:
        return {"error": {"kind": "raised", "line": _snippet_line(e.__traceback__),
                          "exception": type(e).__name__, "message": str(e)}}
    problem = _check_plain(value, "result")
    if problem:
        return {"error": {"kind": "bad_result", "message": problem}}
    return {"value": value}
"##;

/// Runs the snippet runner with its command-line arguments (without the program name) and
/// returns the process exit code. Call this only in a process of its own: it lowers the
/// process's resource limits for good.
pub fn main(args: impl IntoIterator<Item = String>) -> i32 {
    let mut memory_mib: u64 = 512;
    let mut cpu_secs: u64 = 10;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (arg.as_str(), value) {
            ("--memory-mib", Some(v)) => memory_mib = v,
            ("--cpu-secs", Some(v)) => cpu_secs = v,
            _ => {
                eprintln!("usage: rbb-snippet [--memory-mib N] [--cpu-secs N] < requests.jsonl");
                return 2;
            }
        }
    }
    limit(libc::RLIMIT_AS, memory_mib.saturating_mul(1024 * 1024));
    limit(libc::RLIMIT_CPU, cpu_secs);
    limit(libc::RLIMIT_NOFILE, 16);
    limit(libc::RLIMIT_NPROC, 0);

    // The interpreter runs on a thread with a known stack so deep recursion is a Python
    // RecursionError, not a native stack overflow.
    let worker = std::thread::Builder::new().stack_size(64 * 1024 * 1024).spawn(serve);
    match worker.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        _ => 70,
    }
}

fn limit(resource: libc::__rlimit_resource_t, value: u64) {
    let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads a fully initialised struct; failure leaves the limit unchanged.
    unsafe {
        libc::setrlimit(resource, &lim);
    }
}

fn serve() -> i32 {
    use rustpython::InterpreterBuilderExt;
    let interp = rustpython::InterpreterBuilder::new().init_stdlib().interpreter();
    interp.enter(|vm| {
        let scope = vm.new_scope_with_builtins();
        let source = DRIVER_SOURCE.replace("%OUTPUT_LIMIT%", &OUTPUT_LIMIT.to_string());
        let driver = match vm.compile(&source, rustpython_vm::compiler::Mode::Exec, "<driver>".to_owned()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("rbb-snippet: driver does not compile: {e}");
                return 70;
            }
        };
        if let Err(exc) = vm.run_code_obj(driver, scope.clone()) {
            vm.print_exception(exc);
            return 70;
        }
        let run = match scope.globals.get_item("_run", vm) {
            Ok(f) => f,
            Err(exc) => {
                vm.print_exception(exc);
                return 70;
            }
        };
        let stdin = std::io::stdin();
        let mut stdout = std::io::stdout();
        // Tell the parent the interpreter is up: its wall clock starts per request, not here.
        if stdout.write_all(b"{\"ready\":true}\n").and_then(|()| stdout.flush()).is_err() {
            return 0;
        }
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            let mut crashed = false;
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let id = req.id;
                    // A panic inside RustPython (reachable from Python, e.g. by reading the
                    // names of every `object.__subclasses__()`) is that snippet's crash.
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| evaluate(vm, &run, req))) {
                        Ok(response) => response,
                        Err(panic) => {
                            crashed = true;
                            let what = panic
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_owned())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a panic".to_owned());
                            Response {
                                id,
                                value: None,
                                error: Some(SnippetError::Crashed {
                                    message: format!("a fault inside RustPython: {what}"),
                                }),
                                output: String::new(),
                            }
                        }
                    }
                }
                Err(e) => Response {
                    id: 0,
                    value: None,
                    error: Some(SnippetError::Runner { message: format!("bad request: {e}") }),
                    output: String::new(),
                },
            };
            let Ok(mut text) = serde_json::to_string(&response) else { return 70 };
            text.push('\n');
            if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                return 0;
            }
            if crashed {
                // The interpreter may be left half-way through something: never reuse it.
                return 0;
            }
        }
        0
    })
}

fn evaluate(vm: &VirtualMachine, run: &PyObjectRef, req: Request) -> Response {
    let fail = |message: String| Response {
        id: req.id,
        value: None,
        error: Some(SnippetError::Runner { message }),
        output: String::new(),
    };
    let ctx = match py_serde::deserialize(vm, req.ctx.clone()) {
        Ok(ctx) => ctx,
        Err(e) => return fail(format!("cannot pass ctx: {e}")),
    };
    let code = vm.ctx.new_str(req.code.as_str());
    let out = match run.call((code, ctx), vm) {
        Ok(out) => out,
        Err(exc) => {
            let mut text = String::new();
            let _ = vm.write_exception(&mut text, &exc);
            return fail(format!("driver failed: {text}"));
        }
    };
    let json = match serde_json::to_value(py_serde::PyObjectSerializer::new(vm, &out)) {
        Ok(json) => json,
        Err(e) => return fail(format!("cannot read result: {e}")),
    };
    let output = json.get("output").and_then(|o| o.as_str()).unwrap_or_default().to_owned();
    if let Some(error) = json.get("error") {
        return match serde_json::from_value::<SnippetError>(error.clone()) {
            Ok(error) => Response { id: req.id, value: None, error: Some(error), output },
            Err(e) => fail(format!("bad driver error: {e}")),
        };
    }
    Response { id: req.id, value: Some(json.get("value").cloned().unwrap_or_default()), error: None, output }
}
