//! What a change to the pipelines would do: builders added, removed and changed, and which
//! steps get a new cache key (and so will run again instead of being reused), with the
//! fields of the key's document that changed.

use crate::cache_key::{document_changes, last_keys, plan_step_document};
use crate::render::{short, triggers};
use rbb_schema::plan::{Plan, PlanBuilder, PlanStep};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
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
    /// Steps whose cache key changed (they cannot be reused from the cache), and why.
    pub rekeyed: Vec<Rekeyed>,
}

/// A step whose static cache key changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rekeyed {
    pub step: String,
    /// The fields of the key's document that differ (docs/cache-key.md), sorted: `run`,
    /// `env.<NAME>`, `pass_env`, `workdir`, `image`, `inputs`, `outputs`, `after` (an earlier
    /// step of the builder changed), `needs.<builder>` (that upstream builder's last step
    /// changed, or it was added to or removed from `needs`), or `format` when only the key's
    /// encoding differs (a plan saved by another release).
    pub changed: Vec<String>,
}

/// The key of the last step of every builder of a plan: what its downstream builders' keys
/// take as `needs`.
type LastKeys<'a> = BTreeMap<&'a str, &'a str>;

impl PlanDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

pub fn diff(old: &Plan, new: &Plan) -> PlanDiff {
    let o: BTreeMap<&str, &PlanBuilder> = old.builders.iter().map(|b| (b.id.as_str(), b)).collect();
    let n: BTreeMap<&str, &PlanBuilder> = new.builders.iter().map(|b| (b.id.as_str(), b)).collect();
    let keys = (last_keys(old), last_keys(new));
    let mut d = PlanDiff { old_hash: old.hash.clone(), new_hash: new.hash.clone(), ..Default::default() };
    for (id, nb) in &n {
        match o.get(id) {
            None => d.added.push((*id).to_owned()),
            Some(ob) => {
                let c = builder_change(ob, nb, &keys);
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

fn builder_change(o: &PlanBuilder, n: &PlanBuilder, keys: &(LastKeys, LastKeys)) -> BuilderChange {
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
    for (i, s) in n.steps.iter().enumerate() {
        match os.get(s.name.as_str()) {
            None => c.steps_added.push(s.name.clone()),
            Some(old) => {
                let what = step_change(old, s);
                if !what.is_empty() {
                    c.steps_changed.push((s.name.clone(), what));
                }
                if old.key != s.key {
                    let j = o.steps.iter().position(|x| x.name == s.name).unwrap_or_default();
                    c.rekeyed.push(Rekeyed { step: s.name.clone(), changed: key_changes(o, j, n, i, keys) });
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

/// Why step `j` of `o` and step `i` of `n` have different keys: the fields of their key
/// documents that differ, rebuilt from the plans (the previous step's key, the last keys of
/// the builders they need).
fn key_changes(o: &PlanBuilder, j: usize, n: &PlanBuilder, i: usize, keys: &(LastKeys, LastKeys)) -> Vec<String> {
    let old_doc = plan_step_document(o, j, |id| keys.0.get(id).copied()).unwrap_or_default();
    let new_doc = plan_step_document(n, i, |id| keys.1.get(id).copied()).unwrap_or_default();
    let mut changed = Vec::new();
    for field in document_changes(&old_doc, &new_doc) {
        if field != "needs" {
            changed.push(field);
            continue;
        }
        // Name the upstream builders whose last key moved (or that came or went).
        let ids: BTreeSet<&str> = o.needs.iter().chain(&n.needs).map(String::as_str).collect();
        let named: Vec<String> = ids
            .into_iter()
            .filter(|id| {
                let was = o.needs.iter().any(|x| x == id).then(|| keys.0.get(id)).flatten();
                let is = n.needs.iter().any(|x| x == id).then(|| keys.1.get(id)).flatten();
                was != is
            })
            .map(|id| format!("needs.{id}"))
            .collect();
        if named.is_empty() {
            changed.push(field);
        } else {
            changed.extend(named);
        }
    }
    if changed.is_empty() {
        // Same document, different keys: one plan's keys were made by another encoding.
        changed.push("format".to_owned());
    }
    changed
}

/// How a reason of [`Rekeyed::changed`] reads in the text output.
fn explain(field: &str) -> String {
    match field {
        "after" => "after (an earlier step changed)".to_owned(),
        "format" => "format (the old plan's keys use another encoding)".to_owned(),
        f if f.starts_with("needs.") => format!("{f} (an upstream builder changed)"),
        f => f.to_owned(),
    }
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
            let names: Vec<&str> = c.rekeyed.iter().map(|r| r.step.as_str()).collect();
            let _ = writeln!(out, "    re-keyed (will not reuse cached results): {}", names.join(", "));
            for r in &c.rekeyed {
                let why: Vec<String> = r.changed.iter().map(|f| explain(f)).collect();
                let _ = writeln!(out, "      {}: {}", r.step, why.join(", "));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(case: &str) -> Plan {
        let path = format!("{}/../testdata/compiler/{case}/plan.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read plan")).expect("plan JSON")
    }

    fn rekeyed(d: &PlanDiff) -> Vec<(String, String, Vec<String>)> {
        d.changed
            .iter()
            .flat_map(|c| c.rekeyed.iter().map(|r| (c.id.clone(), r.step.clone(), r.changed.clone())))
            .collect()
    }

    /// An upstream builder's command changes: its own step says `run`, every builder that
    /// needs it names it, and nothing else is re-keyed.
    #[test]
    fn an_upstream_change_is_named_downstream() {
        let old = plan("cross-repo-needs");
        let mut new = old.clone();
        let lib = new.builders.iter_mut().find(|b| b.id == "lib/build").expect("lib/build");
        lib.steps[0].run.push_str(" V=1");
        // Recompute the keys as the compiler would (in the plan's order, upstream first).
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        for _ in 0..new.builders.len() {
            for b in &mut new.builders {
                let up: Vec<String> = b.needs.iter().filter_map(|n| last.get(n).cloned()).collect();
                let mut prev: Option<String> = None;
                for s in &mut b.steps {
                    s.key = crate::cache_key::step_key(s, &b.services, prev.as_deref(), &up);
                    prev = Some(s.key.clone());
                }
                last.insert(b.id.clone(), prev.unwrap_or_default());
            }
        }
        let d = diff(&old, &new);
        let why = rekeyed(&d);
        assert!(why.contains(&("lib/build".into(), "step-1".into(), vec!["run".into()])), "{why:?}");
        assert!(why.contains(&("app/build".into(), "step-1".into(), vec!["needs.lib/build".into()])), "{why:?}");
        assert!(why.iter().all(|(b, _, w)| b == "lib/build" || w.iter().all(|x| x.starts_with("needs."))), "{why:?}");
        let text = render(&d);
        assert!(text.contains("      step-1: needs.lib/build (an upstream builder changed)"), "{text}");
    }

    /// A plan saved with keys of another encoding: the documents agree, so the reason is the
    /// format, never an empty list.
    #[test]
    fn keys_of_another_encoding_say_format() {
        let new = plan("minimal");
        let mut old = new.clone();
        old.builders[0].steps[0].key = "sha256:0000".into();
        let why = rekeyed(&diff(&old, &new));
        assert_eq!(why, [("app/build".to_owned(), "step-1".to_owned(), vec!["format".to_owned()])]);
    }
}
