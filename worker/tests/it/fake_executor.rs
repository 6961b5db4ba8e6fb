//! A fake executor that records its calls and checks they come in the expected order; it
//! implements the same [`Executor`] trait as the real ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use rbb_schema::proto::StepResult;
use rbb_worker::{Executor, Output, StepOutcome, StepSpec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One expected call and how to answer it.
struct Expected {
    command: String,
    result: StepResult,
    stdout: Vec<u8>,
    /// Run until cancelled instead of finishing at once.
    block: bool,
}

#[derive(Default)]
pub struct FakeExecutor {
    /// Images it knows, with their digests.
    images: HashMap<String, String>,
    expected: Mutex<VecDeque<Expected>>,
    calls: Mutex<Vec<StepSpec>>,
    /// Builds whose container it was told to remove without a step.
    pub ended_containers: Mutex<Vec<u64>>,
    violations: Mutex<Vec<String>>,
}

impl FakeExecutor {
    /// Expects `command` next; answers with `stdout` and `result`.
    pub fn expect(self, command: &str, result: StepResult, stdout: &str) -> FakeExecutor {
        self.push(command, result, stdout, false)
    }

    /// Knows `image`, whose digest is `digest`.
    pub fn with_image(mut self, image: &str, digest: &str) -> FakeExecutor {
        self.images.insert(image.to_owned(), digest.to_owned());
        self
    }

    /// Expects `command` next; runs until cancelled, then answers CANCELLED.
    pub fn expect_blocking(self, command: &str) -> FakeExecutor {
        self.push(command, StepResult::Cancelled, "", true)
    }

    fn push(self, command: &str, result: StepResult, stdout: &str, block: bool) -> FakeExecutor {
        self.expected.lock().unwrap().push_back(Expected {
            command: command.to_owned(),
            result,
            stdout: stdout.as_bytes().to_vec(),
            block,
        });
        self
    }

    /// Commands run so far, in call order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|s| s.command.clone()).collect()
    }

    pub fn specs(&self) -> Vec<StepSpec> {
        self.calls.lock().unwrap().clone()
    }

    /// Calls that did not match the expected order.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Every expected call happened, in order, and nothing else.
    pub fn assert_done(&self) {
        let violations = self.violations();
        assert!(violations.is_empty(), "calls out of order: {violations:?}");
        let left: Vec<String> = self.expected.lock().unwrap().iter().map(|e| e.command.clone()).collect();
        assert!(left.is_empty(), "expected calls never made: {left:?}");
    }
}

impl Executor for FakeExecutor {
    fn run(&self, spec: StepSpec, out: mpsc::Sender<Output>, cancel: CancellationToken) -> BoxFuture<'_, StepOutcome> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(spec.clone());
            let next = self.expected.lock().unwrap().pop_front();
            let Some(expected) = next else {
                self.violations.lock().unwrap().push(format!("unexpected call {:?}", spec.command));
                return StepOutcome::exception("unexpected call", Duration::ZERO);
            };
            if expected.command != spec.command {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("expected {:?}, got {:?}", expected.command, spec.command));
            }
            if !expected.stdout.is_empty() {
                let _ = out.send(Output::Stdout(expected.stdout.clone())).await;
            }
            if expected.block {
                cancel.cancelled().await;
            }
            let exit_code = match expected.result {
                StepResult::Success => Some(0),
                StepResult::Failure => Some(1),
                _ => None,
            };
            StepOutcome {
                result: expected.result,
                exit_code,
                reason: match expected.result {
                    StepResult::Success => String::new(),
                    StepResult::Cancelled => "cancelled".to_owned(),
                    _ => "exit code 1".to_owned(),
                },
                duration: Duration::from_millis(1),
                image_digest: spec.image.as_ref().and_then(|i| self.images.get(i)).cloned().unwrap_or_default(),
            }
        })
    }

    fn end_build_container(&self, build: u64) -> BoxFuture<'_, ()> {
        self.ended_containers.lock().unwrap().push(build);
        Box::pin(std::future::ready(()))
    }

    fn image_digest<'a>(&'a self, image: &'a str) -> BoxFuture<'a, Result<String, String>> {
        let known = self.images.get(image).cloned().ok_or_else(|| format!("image `{image}` is unknown"));
        Box::pin(std::future::ready(known))
    }
}

#[tokio::test]
async fn the_fake_checks_call_order() {
    let spec = |command: &str| StepSpec {
        command: command.to_owned(),
        env: Default::default(),
        cwd: "/".into(),
        timeout: None,
        image: None,
        container: Default::default(),
    };
    async fn run(fake: &FakeExecutor, spec: StepSpec) -> StepOutcome {
        let (tx, _rx) = mpsc::channel(8);
        fake.run(spec, tx, CancellationToken::new()).await
    }

    let fake =
        FakeExecutor::default().expect("build", StepResult::Success, "built\n").expect("test", StepResult::Failure, "");
    assert_eq!(run(&fake, spec("build")).await.result, StepResult::Success);
    assert_eq!(run(&fake, spec("test")).await.result, StepResult::Failure);
    fake.assert_done();
    assert_eq!(fake.calls(), ["build", "test"]);

    let fake = FakeExecutor::default().expect("build", StepResult::Success, "").expect("test", StepResult::Success, "");
    run(&fake, spec("test")).await;
    run(&fake, spec("build")).await;
    run(&fake, spec("deploy")).await;
    assert_eq!(
        fake.violations(),
        ["expected \"build\", got \"test\"", "expected \"test\", got \"build\"", "unexpected call \"deploy\"",]
    );
}
