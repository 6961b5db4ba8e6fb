//! The static part of step cache keys, and the plan hash.
//!
//! Both are `sha256:<hex>` of a canonical JSON encoding (object keys sorted by their UTF-8
//! bytes, no whitespace, serde_json's string escaping). The format is written down in
//! `docs/cache-key.md` with test vectors; a test here keeps the two in step.
//!
//! The static key covers what the compiler knows: the rendered command, its environment,
//! working directory, image, declared inputs and outputs, the key of the step before it in
//! the builder and the keys of the builders it needs. At run time the master adds the git
//! tree ids of the inputs, the env allow-list's values, the image digest and the platform.

use rbb_schema::plan::{Plan, PlanStep};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Identifies this encoding; bump it when the fields change.
pub const STEP_KEY_FORMAT: &str = "rbb-step-key/1";

/// The static cache key of `step`.
pub fn step_key(step: &PlanStep, previous: Option<&str>, upstream: &[String]) -> String {
    let doc = step_key_document(step, previous, upstream);
    sha256(&canonical_json(&doc))
}

/// The document hashed by [`step_key`] (shown by "why did this re-run?").
pub fn step_key_document(step: &PlanStep, previous: Option<&str>, upstream: &[String]) -> Value {
    let mut upstream: Vec<&str> = upstream.iter().map(String::as_str).filter(|k| !k.is_empty()).collect();
    upstream.sort_unstable();
    upstream.dedup();
    serde_json::json!({
        "format": STEP_KEY_FORMAT,
        "run": step.run,
        "env": step.env,
        "pass_env": step.pass_env,
        "workdir": step.workdir,
        "image": step.image,
        "inputs": step.inputs,
        "outputs": step.outputs,
        "after": previous,
        "needs": upstream,
    })
}

/// Hash of what a plan runs: everything but the hash itself, builder source locations, and
/// the commits and blob ids it was read from.
pub fn plan_hash(plan: &Plan) -> String {
    let mut v = serde_json::to_value(plan).unwrap_or(Value::Null);
    if let Value::Object(top) = &mut v {
        top.remove("hash");
        if let Some(Value::Array(builders)) = top.get_mut("builders") {
            for b in builders {
                if let Value::Object(b) = b {
                    b.remove("source");
                }
            }
        }
        if let Some(Value::Array(repos)) = top.get_mut("repos") {
            for r in repos {
                if let Value::Object(r) = r {
                    r.remove("commit");
                    r.remove("pipeline_blob");
                }
            }
        }
    }
    sha256(&canonical_json(&v))
}

/// `sha256:<lowercase hex>` of `text`.
pub fn sha256(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Canonical JSON: sorted object keys, no whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn step(run: &str) -> PlanStep {
        PlanStep {
            name: "build".into(),
            run: run.into(),
            env: BTreeMap::from([("B".to_owned(), "2".to_owned()), ("A".to_owned(), "1".to_owned())]),
            pass_env: vec![],
            workdir: None,
            timeout_secs: 60,
            halt_on_failure: true,
            flunk_on_failure: true,
            warn_on_failure: false,
            always_run: false,
            condition: None,
            image: None,
            inputs: vec!["src".into()],
            outputs: vec![],
            key: String::new(),
        }
    }

    /// The test vectors of docs/cache-key.md.
    #[test]
    fn documented_vectors() {
        let s = step("make");
        assert_eq!(
            canonical_json(&step_key_document(&s, None, &[])),
            r#"{"after":null,"env":{"A":"1","B":"2"},"format":"rbb-step-key/1","image":null,"inputs":["src"],"needs":[],"outputs":[],"pass_env":[],"run":"make","workdir":null}"#
        );
        let docs = include_str!("../../docs/cache-key.md");
        let first = step_key(&s, None, &[]);
        assert!(docs.contains(&first), "docs/cache-key.md lacks vector {first}");
        let second = step_key(&step("make test"), Some(&first), &[]);
        assert!(docs.contains(&second), "docs/cache-key.md lacks vector {second}");
    }

    #[test]
    fn name_timeout_and_flags_do_not_change_the_key() {
        let a = step("make");
        let mut b = step("make");
        b.name = "other".into();
        b.timeout_secs = 5;
        b.halt_on_failure = false;
        assert_eq!(step_key(&a, None, &[]), step_key(&b, None, &[]));
        b.run = "make all".into();
        assert_ne!(step_key(&a, None, &[]), step_key(&b, None, &[]));
        assert_ne!(step_key(&a, None, &[]), step_key(&a, Some("sha256:00"), &[]));
        assert_eq!(
            step_key(&a, None, &["sha256:1".into(), "sha256:2".into()]),
            step_key(&a, None, &["sha256:2".into(), "sha256:1".into()])
        );
    }
}
