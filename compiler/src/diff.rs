//! What a change to the pipelines would do: builders added, removed and changed, and which
//! steps get a new cache key (and so will run again instead of being reused).

use crate::render::{short, triggers};
use rbb_schema::plan::{Plan, PlanBuilder, PlanStep};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanDiff {
    pub old_hash: String,
    pub new_hash: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<BuilderChange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BuilderChange {
    pub id: String,
    /// Builder-level differences, one line each (`needs`, `labels`, `on`, ...).
    pub fields: Vec<String>,
    pub steps_added: Vec<String>,
    pub steps_removed: Vec<String>,
    /// Step name and what changed in it.
    pub steps_changed: Vec<(String, Vec<String>)>,
    /// Steps whose cache key changed (they cannot be reused from the cache).
    pub rekeyed: Vec<String>,
}

impl PlanDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

pub fn diff(old: &Plan, new: &Plan) -> PlanDiff {
    let o: BTreeMap<&str, &PlanBuilder> = old.builders.iter().map(|b| (b.id.as_str(), b)).collect();
    let n: BTreeMap<&str, &PlanBuilder> = new.builders.iter().map(|b| (b.id.as_str(), b)).collect();
    let mut d = PlanDiff { old_hash: old.hash.clone(), new_hash: new.hash.clone(), ..Default::default() };
    for (id, nb) in &n {
        match o.get(id) {
            None => d.added.push((*id).to_owned()),
            Some(ob) => {
                let c = builder_change(ob, nb);
                if c != (BuilderChange { id: (*id).to_owned(), ..Default::default() }) {
                    d.changed.push(c);
                }
            }
        }
    }
    d.removed = o.keys().filter(|id| !n.contains_key(*id)).map(|s| (*s).to_owned()).collect();
    d
}

fn list_change(name: &str, old: &[String], new: &[String]) -> Option<String> {
    if old == new {
        return None;
    }
    let plus: Vec<&str> = new.iter().filter(|x| !old.contains(x)).map(String::as_str).collect();
    let minus: Vec<&str> = old.iter().filter(|x| !new.contains(x)).map(String::as_str).collect();
    let mut parts = Vec::new();
    if !plus.is_empty() {
        parts.push(format!("+ {}", plus.join(", ")));
    }
    if !minus.is_empty() {
        parts.push(format!("- {}", minus.join(", ")));
    }
    if parts.is_empty() {
        parts.push("reordered".to_owned());
    }
    Some(format!("{name}: {}", parts.join("; ")))
}

fn opt_change(name: &str, old: &Option<String>, new: &Option<String>) -> Option<String> {
    (old != new)
        .then(|| format!("{name}: {} → {}", old.as_deref().unwrap_or("(none)"), new.as_deref().unwrap_or("(none)")))
}

fn builder_change(o: &PlanBuilder, n: &PlanBuilder) -> BuilderChange {
    let mut c = BuilderChange { id: n.id.clone(), ..Default::default() };
    c.fields.extend(list_change("needs", &o.needs, &n.needs));
    c.fields.extend(list_change("labels", &o.labels, &n.labels));
    c.fields.extend(list_change("tags", &o.tags, &n.tags));
    c.fields.extend(opt_change("image", &o.image, &n.image));
    c.fields.extend(opt_change("description", &o.description, &n.description));
    if o.triggers != n.triggers {
        c.fields.push(format!("on: {} → {}", triggers(&o.triggers), triggers(&n.triggers)));
    }
    if o.priority != n.priority {
        c.fields.push(format!("priority: {} → {}", o.priority, n.priority));
    }
    let os: BTreeMap<&str, &PlanStep> = o.steps.iter().map(|s| (s.name.as_str(), s)).collect();
    let ns: BTreeMap<&str, &PlanStep> = n.steps.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in &n.steps {
        match os.get(s.name.as_str()) {
            None => c.steps_added.push(s.name.clone()),
            Some(old) => {
                let what = step_change(old, s);
                if !what.is_empty() {
                    c.steps_changed.push((s.name.clone(), what));
                }
                if old.key != s.key {
                    c.rekeyed.push(s.name.clone());
                }
            }
        }
    }
    c.steps_removed = o.steps.iter().filter(|s| !ns.contains_key(s.name.as_str())).map(|s| s.name.clone()).collect();
    let old_order: Vec<&str> = o.steps.iter().map(|s| s.name.as_str()).filter(|s| ns.contains_key(s)).collect();
    let new_order: Vec<&str> = n.steps.iter().map(|s| s.name.as_str()).filter(|s| os.contains_key(s)).collect();
    if old_order != new_order {
        c.fields.push("steps reordered".to_owned());
    }
    c
}

fn step_change(o: &PlanStep, n: &PlanStep) -> Vec<String> {
    let mut w = Vec::new();
    let mut check = |name: &str, changed: bool| {
        if changed {
            w.push(name.to_owned());
        }
    };
    check("run", o.run != n.run);
    check("env", o.env != n.env);
    check("pass_env", o.pass_env != n.pass_env);
    check("workdir", o.workdir != n.workdir);
    check("timeout", o.timeout_secs != n.timeout_secs);
    check(
        "flags",
        (o.halt_on_failure, o.flunk_on_failure, o.warn_on_failure, o.always_run)
            != (n.halt_on_failure, n.flunk_on_failure, n.warn_on_failure, n.always_run),
    );
    check("if", o.condition != n.condition);
    check("image", o.image != n.image);
    check("inputs", o.inputs != n.inputs);
    check("outputs", o.outputs != n.outputs);
    w
}

pub fn render(d: &PlanDiff) -> String {
    let mut out = String::new();
    if d.is_empty() {
        let _ = writeln!(out, "no changes (plan {})", short(&d.new_hash));
        return out;
    }
    let _ = writeln!(
        out,
        "plan {} → {}: {} added, {} removed, {} changed",
        short(&d.old_hash),
        short(&d.new_hash),
        d.added.len(),
        d.removed.len(),
        d.changed.len()
    );
    for id in &d.added {
        let _ = writeln!(out, "+ {id}");
    }
    for id in &d.removed {
        let _ = writeln!(out, "- {id}");
    }
    for c in &d.changed {
        let _ = writeln!(out, "~ {}", c.id);
        for f in &c.fields {
            let _ = writeln!(out, "    {f}");
        }
        for s in &c.steps_added {
            let _ = writeln!(out, "    + step {s}");
        }
        for s in &c.steps_removed {
            let _ = writeln!(out, "    - step {s}");
        }
        for (s, what) in &c.steps_changed {
            let _ = writeln!(out, "    ~ step {s}: {}", what.join(", "));
        }
        if !c.rekeyed.is_empty() {
            let _ = writeln!(out, "    re-keyed (will not reuse cached results): {}", c.rekeyed.join(", "));
        }
    }
    out
}
