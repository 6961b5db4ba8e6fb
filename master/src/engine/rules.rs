//! The rules that decide a build's result, as pure functions over its records: what a
//! step's result does to its build, when a build is finished and with what, what a stop,
//! a lost worker or a newer change does to it, and whether its needs let it start.
//!
//! Nothing here touches the store, the clock or a worker: callers pass `now` and apply the
//! returned records through a transaction. Each rule is tested directly below.

use crate::model::{BuildRecord, StepRecord};
use rbb_schema::api::State;
use rbb_schema::results::Outcome;

/// A step's result flags, from the plan (Buildbot's meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFlags {
    pub flunk_on_failure: bool,
    pub warn_on_failure: bool,
    pub halt_on_failure: bool,
}

impl Default for StepFlags {
    fn default() -> Self {
        StepFlags { flunk_on_failure: true, warn_on_failure: false, halt_on_failure: true }
    }
}

/// A step's report, as the worker sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub result: Outcome,
    pub exit_code: Option<i32>,
    pub reason: String,
}

/// Records a finished step and what it does to its build: the build's result so far,
/// whether later steps are halted, whether the build was cancelled.
pub fn finish_step(b: &mut BuildRecord, step: u32, report: &StepReport, flags: StepFlags, now: u64) {
    let Some(s) = b.steps.get_mut(step as usize) else { return };
    s.state = State::Finished;
    s.result = Some(report.result);
    s.exit_code = report.exit_code;
    s.reason = report.reason.clone();
    s.finished_at = Some(now);
    let name = s.name.clone();
    let contribution = match report.result {
        Outcome::Failure if flags.flunk_on_failure => Some(Outcome::Failure),
        Outcome::Failure if flags.warn_on_failure => Some(Outcome::Warnings),
        Outcome::Failure => None,
        Outcome::Success | Outcome::Skipped | Outcome::Cached | Outcome::NotAffected => None,
        other => Some(other),
    };
    if let Some(c) = contribution {
        let before = b.result;
        b.result = Some(b.result.map_or(c, |r| r.worst(c)));
        // The reason names the step that made the result what it is, unless a stop does.
        if !b.cancelled && (b.result != before || b.result_reason.is_empty()) {
            b.result_reason = format!("step {} ({}): {}", step + 1, name, report.reason);
        }
    }
    if (report.result == Outcome::Failure && flags.halt_on_failure) || report.result == Outcome::Exception {
        b.halted = true;
    }
    if report.result == Outcome::Cancelled {
        b.cancelled = true;
    }
}

/// Why the build's next pending step does not run, if it does not.
/// `condition` is the step's `if:` text and what it evaluated to.
pub fn skip_reason(
    b: &BuildRecord,
    always_run: bool,
    condition: Option<(&str, Result<bool, String>)>,
) -> Option<String> {
    if b.cancelled {
        return Some("the build was stopped".to_owned());
    }
    if b.halted && !always_run {
        return Some("an earlier step halted the build".to_owned());
    }
    match condition {
        Some((_, Ok(true))) | None => None,
        Some((c, Ok(false))) => Some(format!("`if: {c}` is false")),
        Some((c, Err(e))) => Some(format!("`if: {c}` does not parse: {e}")),
    }
}

/// The build property that marks a pull request whose head lives in a fork: its steps that
/// use a secret are skipped.
pub const FORK_PROPERTY: &str = "fork";

/// Whether `b` builds a pull request from a fork (secrets are not given to it).
pub fn from_fork(b: &BuildRecord) -> bool {
    b.event == "pull_request" && b.properties.get(FORK_PROPERTY).is_none_or(|v| v != "false")
}

/// Marks a step skipped.
pub fn skip_step(s: &mut StepRecord, why: String, now: u64) {
    s.state = State::Finished;
    s.result = Some(Outcome::Skipped);
    s.reason = why;
    s.finished_at = Some(now);
}

/// Closes a build: steps that never ran are SKIPPED, and the result is final. A stopped
/// build is CANCELLED whatever its last step did; otherwise the worst step contribution,
/// or SUCCESS. The state itself is set by the caller (it keeps the indexes).
pub fn close_build(b: &mut BuildRecord, now: u64) -> Outcome {
    for s in &mut b.steps {
        if s.state != State::Finished {
            s.state = State::Finished;
            s.result = Some(Outcome::Skipped);
            if s.reason.is_empty() {
                s.reason = "the build ended first".into();
            }
        }
    }
    let result = if b.cancelled {
        if b.result_reason.is_empty() {
            b.result_reason = "stopped".to_owned();
        }
        Outcome::Cancelled
    } else if let Some(r) = b.result {
        r
    } else if b.steps.iter().any(|s| s.result == Some(Outcome::Cached))
        && b.steps.iter().all(|s| matches!(s.result, Some(Outcome::Cached | Outcome::Skipped)))
    {
        // Nothing ran: every step was reused (or skipped).
        Outcome::Cached
    } else {
        Outcome::Success
    };
    b.result = Some(result);
    b.finished_at = Some(now);
    result
}

/// Whether step `step` of a build may be reused from the cache (docs/cache.md), or why
/// not. Every earlier step that ran must have passed with a full key: a step after one that
/// no key describes could depend on what that step did.
pub fn cache_eligible(b: &BuildRecord, spec: &rbb_schema::plan::PlanStep, step: u32) -> Result<(), String> {
    if !spec.cache {
        return Err("`cache: false`".to_owned());
    }
    if spec.inputs.is_empty() {
        return Err("no `inputs:` declared".to_owned());
    }
    for earlier in b.steps.iter().take(step as usize) {
        match earlier.result {
            Some(Outcome::Skipped) => {}
            Some(Outcome::Success | Outcome::Cached) if cache_key_of(earlier).is_some() => {}
            Some(Outcome::Success | Outcome::Cached) => {
                return Err(format!("an earlier step, `{}`, is not cacheable", earlier.name));
            }
            _ => return Err(format!("an earlier step, `{}`, did not pass", earlier.name)),
        }
    }
    Ok(())
}

/// The full key of the nearest earlier step that ran (the `after` of step `step`'s key).
pub fn previous_key(b: &BuildRecord, step: u32) -> Option<String> {
    b.steps.iter().take(step as usize).rev().find(|s| s.result != Some(Outcome::Skipped)).and_then(cache_key_of)
}

fn cache_key_of(s: &StepRecord) -> Option<String> {
    s.cache.as_ref().filter(|c| c.state != rbb_schema::api::CacheState::Disabled).and_then(|c| c.key.clone())
}

/// Marks a build as stopped. Its running step is cancelled by the caller; whatever that
/// step reports afterwards, the build ends CANCELLED.
pub fn stop(b: &mut BuildRecord, reason: &str) {
    b.cancelled = true;
    b.result_reason = reason.to_owned();
}

/// What losing its worker (or the master) does to a running build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Whether a new attempt is queued.
    pub retry: bool,
    /// Logs of the steps that were running, to close.
    pub logs: Vec<u64>,
}

/// Who was lost while a build ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Its worker: counts towards giving up (a step that kills its worker every time).
    Worker,
    /// The master (a restart): not the build's doing, always retried.
    Master,
}

/// A running build lost its worker or the master: its running step becomes RETRY; the build
/// ends RETRY (a new attempt follows), CANCELLED if it had been stopped, or EXCEPTION once
/// `max_worker_losses` attempts lost their worker.
pub fn lose(b: &mut BuildRecord, why: &str, loss: Loss, max_worker_losses: u32, now: u64) -> Lost {
    let mut logs = Vec::new();
    for s in &mut b.steps {
        if s.state == State::Running {
            s.state = State::Finished;
            s.result = Some(Outcome::Retry);
            s.reason = why.to_owned();
            s.finished_at = Some(now);
            logs.extend(s.log_id);
        }
    }
    if loss == Loss::Worker {
        b.worker_losses += 1;
    }
    let retry = !b.cancelled && (loss == Loss::Master || b.worker_losses < max_worker_losses);
    if b.cancelled {
        // close_build makes it CANCELLED with the stop's reason.
    } else if retry {
        b.result = Some(Outcome::Retry);
        b.result_reason = why.to_owned();
    } else {
        b.result = Some(Outcome::Exception);
        b.result_reason = format!("{why}; gave up after {} attempts lost their worker", b.worker_losses);
    }
    Lost { retry, logs }
}

/// The next attempt of a lost build: same builder, commit, plan and changes; fresh steps.
pub fn retry_of(old: &BuildRecord, id: u64, now: u64) -> BuildRecord {
    let mut nb = old.clone();
    nb.id = id;
    nb.reason = format!("retry of build {}", old.id);
    nb.state = State::Pending;
    nb.result = None;
    nb.result_reason = String::new();
    nb.worker = None;
    nb.halted = false;
    nb.cancelled = false;
    nb.checked_out = false;
    nb.attempt = old.attempt + 1;
    nb.submitted_at = now;
    nb.started_at = None;
    nb.finished_at = None;
    for s in &mut nb.steps {
        *s = StepRecord::pending(s.number, &s.name);
    }
    nb
}

/// Which stream of work a build belongs to, for queue policy: a push to one branch, one
/// pull request, one schedule. Forces and rebuilds belong to none: a person asked for
/// exactly that build, so it neither replaces nor is replaced.
pub fn source_key(b: &BuildRecord) -> Option<String> {
    if b.rebuild_of.is_some() {
        return None;
    }
    match b.event.as_str() {
        "push" => Some(format!("push {}", b.branch)),
        "pull_request" => b.properties.get("pr_number").map(|n| format!("pull_request #{n}")),
        "schedule" => Some(format!("schedule {} {}", b.branch, b.reason)),
        _ => None,
    }
}

/// Whether `new` may replace `old` under `collapse` or `cancel_superseded`: same builder,
/// same event and source, and `new` builds a newer change of another commit.
pub fn may_replace(old: &BuildRecord, new: &BuildRecord) -> bool {
    if old.id == new.id || old.builder != new.builder || old.commit == new.commit {
        return false;
    }
    let (Some(a), Some(b)) = (source_key(old), source_key(new)) else { return false };
    if a != b {
        return false;
    }
    match (old.changes.iter().max(), new.changes.iter().max()) {
        (Some(o), Some(n)) => n > o,
        (None, None) => new.id > old.id,
        _ => false,
    }
}

/// Whether a pending build may start, as far as the builds it needs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    Ready,
    /// These needed builds have not finished.
    Waiting(Vec<u64>),
    /// A needed build did not succeed: the build is SKIPPED with this reason.
    Failed(String),
}

pub fn needs<'a>(b: &BuildRecord, lookup: impl Fn(u64) -> Option<&'a BuildRecord>) -> Needs {
    let mut waiting = Vec::new();
    for w in &b.waits_for {
        match lookup(*w) {
            Some(d) if d.state != State::Finished => waiting.push(d.id),
            Some(d) if !d.result.is_some_and(Outcome::is_ok) => {
                let why = if d.result_reason.is_empty() { String::new() } else { format!(": {}", d.result_reason) };
                return Needs::Failed(format!(
                    "needed build {} ({}) ended {}{why}",
                    d.id,
                    d.builder,
                    d.result.unwrap_or(Outcome::Exception)
                ));
            }
            Some(_) => {}
            None => return Needs::Failed(format!("needed build {w} does not exist")),
        }
    }
    if waiting.is_empty() { Needs::Ready } else { Needs::Waiting(waiting) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn build(id: u64, steps: u32) -> BuildRecord {
        BuildRecord {
            id,
            builder: "app/test".into(),
            repo: "app".into(),
            repo_url: "/repo".into(),
            branch: "main".into(),
            commit: format!("c{id}"),
            plan_hash: "p".into(),
            pipeline_blob: None,
            reason: "push".into(),
            event: "push".into(),
            properties: BTreeMap::new(),
            priority: 0,
            state: State::Running,
            result: None,
            result_reason: String::new(),
            worker: Some("w".into()),
            waits_for: Vec::new(),
            halted: false,
            cancelled: false,
            attempt: 1,
            checked_out: true,
            changes: vec![id],
            submitted_at: 0,
            started_at: Some(0),
            finished_at: None,
            rebuild_of: None,
            worker_losses: 0,
            steps: (0..steps).map(|i| StepRecord::pending(i, &format!("s{i}"))).collect(),
        }
    }

    fn report(result: Outcome) -> StepReport {
        StepReport { result, exit_code: Some(0), reason: "r".into() }
    }

    #[test]
    fn a_stopped_build_ends_cancelled_even_if_its_step_succeeded() {
        let mut b = build(1, 2);
        b.steps[0].state = State::Running;
        stop(&mut b, "stopped: by alice");
        // The step exited 0 before the cancel reached it.
        finish_step(&mut b, 0, &report(Outcome::Success), StepFlags::default(), 5);
        assert_eq!(skip_reason(&b, true, None).as_deref(), Some("the build was stopped"));
        assert_eq!(close_build(&mut b, 6), Outcome::Cancelled);
        assert_eq!(b.result, Some(Outcome::Cancelled));
        assert_eq!(b.result_reason, "stopped: by alice");
        assert_eq!(b.steps[1].result, Some(Outcome::Skipped));
    }

    #[test]
    fn step_flags_decide_the_build_result() {
        let mut b = build(1, 3);
        let warn = StepFlags { flunk_on_failure: false, warn_on_failure: true, halt_on_failure: false };
        finish_step(&mut b, 0, &report(Outcome::Failure), warn, 1);
        assert_eq!(b.result, Some(Outcome::Warnings));
        assert!(!b.halted);
        let ignore = StepFlags { flunk_on_failure: false, warn_on_failure: false, halt_on_failure: false };
        finish_step(&mut b, 1, &report(Outcome::Failure), ignore, 2);
        assert_eq!(b.result, Some(Outcome::Warnings));
        finish_step(&mut b, 2, &report(Outcome::Failure), StepFlags::default(), 3);
        assert_eq!(b.result, Some(Outcome::Failure));
        assert!(b.halted);
        assert_eq!(b.result_reason, "step 3 (s2): r");
        assert_eq!(close_build(&mut b, 4), Outcome::Failure);
    }

    #[test]
    fn a_halted_build_runs_only_always_run_steps() {
        let mut b = build(1, 2);
        b.halted = true;
        assert!(skip_reason(&b, false, None).is_some());
        assert_eq!(skip_reason(&b, true, None), None);
        assert_eq!(skip_reason(&b, true, Some(("x", Ok(false)))).as_deref(), Some("`if: x` is false"));
    }

    #[test]
    fn a_lost_build_is_retried_then_gives_up() {
        let mut b = build(1, 2);
        b.steps[0].state = State::Running;
        b.steps[0].log_id = Some(9);
        let lost = lose(&mut b, "worker w was lost", Loss::Worker, 3, 7);
        assert_eq!(lost, Lost { retry: true, logs: vec![9] });
        assert_eq!(b.steps[0].result, Some(Outcome::Retry));
        assert_eq!(close_build(&mut b, 7), Outcome::Retry);
        let next = retry_of(&b, 2, 8);
        assert_eq!((next.attempt, next.state, next.result), (2, State::Pending, None));
        assert!(next.steps.iter().all(|s| s.state == State::Pending));
        let mut last = build(3, 1);
        last.attempt = 5;
        last.worker_losses = 2;
        // Master restarts never use up attempts.
        assert!(lose(&mut last.clone(), "the master restarted", Loss::Master, 3, 9).retry);
        assert!(!lose(&mut last, "gone", Loss::Worker, 3, 9).retry);
        assert_eq!(close_build(&mut last, 9), Outcome::Exception);
        assert!(last.result_reason.contains("gave up after 3 attempts lost their worker"), "{}", last.result_reason);
    }

    #[test]
    fn a_stopped_build_that_loses_its_worker_is_cancelled_not_retried() {
        let mut b = build(1, 1);
        b.steps[0].state = State::Running;
        stop(&mut b, "stopped: by bob");
        assert!(!lose(&mut b, "the master restarted while it ran", Loss::Master, 3, 1).retry);
        assert_eq!(close_build(&mut b, 1), Outcome::Cancelled);
        assert_eq!(b.result_reason, "stopped: by bob");
    }

    #[test]
    fn only_a_newer_change_of_the_same_source_replaces_a_build() {
        let old = build(1, 1);
        let mut new = build(2, 1);
        assert!(may_replace(&old, &new));
        assert!(!may_replace(&new, &old), "an older change never replaces a newer one");
        // A rebuild of an old commit replaces nothing and is not replaced.
        let mut rebuild = build(3, 1);
        rebuild.changes = vec![1];
        rebuild.commit = old.commit.clone();
        rebuild.rebuild_of = Some(1);
        assert!(!may_replace(&new, &rebuild));
        assert!(!may_replace(&rebuild, &new));
        // Another event, another branch, another pull request: no.
        new.event = "schedule".into();
        assert!(!may_replace(&old, &new));
        new.event = "push".into();
        new.branch = "dev".into();
        assert!(!may_replace(&old, &new));
        let mut pr1 = build(4, 1);
        pr1.event = "pull_request".into();
        pr1.branch = "patch-1".into();
        pr1.properties.insert("pr_number".into(), "1".into());
        let mut pr2 = build(5, 1);
        pr2.event = "pull_request".into();
        pr2.branch = "patch-1".into();
        pr2.properties.insert("pr_number".into(), "2".into());
        assert!(!may_replace(&pr1, &pr2), "two forks' `patch-1` are different pull requests");
        let mut pr1b = pr2.clone();
        pr1b.properties.insert("pr_number".into(), "1".into());
        assert!(may_replace(&pr1, &pr1b));
        // The same commit is never "newer".
        let mut same = build(6, 1);
        same.commit = old.commit.clone();
        assert!(!may_replace(&old, &same));
    }

    #[test]
    fn needs_wait_then_pass_or_fail() {
        let mut dep = build(1, 1);
        dep.state = State::Running;
        let mut b = build(2, 1);
        b.waits_for = vec![1];
        assert_eq!(needs(&b, |_| Some(&dep)), Needs::Waiting(vec![1]));
        dep.state = State::Finished;
        dep.result = Some(Outcome::Success);
        assert_eq!(needs(&b, |_| Some(&dep)), Needs::Ready);
        dep.result = Some(Outcome::Failure);
        dep.result_reason = "step 1 (s0): exit code 1".into();
        let Needs::Failed(why) = needs(&b, |_| Some(&dep)) else { panic!("must fail") };
        assert!(why.contains("needed build 1 (app/test) ended FAILURE"), "{why}");
    }

    fn spec(inputs: &[&str], cache: bool) -> rbb_schema::plan::PlanStep {
        rbb_schema::plan::PlanStep {
            name: "s".into(),
            run: "true".into(),
            env: Default::default(),
            secrets: Default::default(),
            pass_env: vec![],
            workdir: None,
            timeout_secs: 60,
            halt_on_failure: true,
            flunk_on_failure: true,
            warn_on_failure: false,
            always_run: false,
            condition: None,
            image: None,
            memory_bytes: None,
            cpus_milli: None,
            network: None,
            user: None,
            mounts: vec![],
            platform: None,
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            outputs: vec![],
            cache,
            key: "sha256:static".into(),
        }
    }

    fn ran(s: &mut StepRecord, result: Outcome, key: Option<&str>) {
        s.state = State::Finished;
        s.result = Some(result);
        s.cache = Some(match key {
            Some(k) => crate::model::StepCacheRecord {
                state: rbb_schema::api::CacheState::Miss,
                key: Some(k.into()),
                reason: None,
                changed: vec![],
                from: None,
                stored: true,
            },
            None => crate::model::StepCacheRecord::disabled("no `inputs:` declared"),
        });
    }

    #[test]
    fn a_step_is_cacheable_only_after_steps_that_passed_with_a_key() {
        let mut b = build(1, 4);
        assert_eq!(cache_eligible(&b, &spec(&[], true), 0), Err("no `inputs:` declared".into()));
        assert_eq!(cache_eligible(&b, &spec(&["src"], false), 0), Err("`cache: false`".into()));
        assert_eq!(cache_eligible(&b, &spec(&["src"], true), 0), Ok(()));
        ran(&mut b.steps[0], Outcome::Success, Some("sha256:k0"));
        skip_step(&mut b.steps[1], "`if: false`".into(), 1);
        // A skipped step changes nothing: the key chains from the last step that ran.
        assert_eq!(cache_eligible(&b, &spec(&["src"], true), 2), Ok(()));
        assert_eq!(previous_key(&b, 2).as_deref(), Some("sha256:k0"));
        ran(&mut b.steps[2], Outcome::Success, None);
        assert_eq!(cache_eligible(&b, &spec(&["src"], true), 3), Err("an earlier step, `s2`, is not cacheable".into()));
        ran(&mut b.steps[2], Outcome::Failure, Some("sha256:k2"));
        assert_eq!(cache_eligible(&b, &spec(&["src"], true), 3), Err("an earlier step, `s2`, did not pass".into()));
        ran(&mut b.steps[2], Outcome::Cached, Some("sha256:k2"));
        assert_eq!(cache_eligible(&b, &spec(&["src"], true), 3), Ok(()));
        assert_eq!(previous_key(&b, 3).as_deref(), Some("sha256:k2"));
    }

    #[test]
    fn a_build_whose_every_step_was_reused_is_cached() {
        let mut b = build(1, 3);
        for i in 0..2 {
            finish_step(&mut b, i, &report(Outcome::Cached), StepFlags::default(), 1);
        }
        skip_step(&mut b.steps[2], "`if: false`".into(), 1);
        assert_eq!(close_build(&mut b, 2), Outcome::Cached);
        let mut b = build(2, 2);
        finish_step(&mut b, 0, &report(Outcome::Cached), StepFlags::default(), 1);
        finish_step(&mut b, 1, &report(Outcome::Success), StepFlags::default(), 1);
        assert_eq!(close_build(&mut b, 2), Outcome::Success);
    }
}
