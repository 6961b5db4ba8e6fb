//! The static part of step cache keys, and the plan hash.
//!
//! Both are `sha256:<hex>` of a canonical JSON encoding (object keys sorted by their UTF-8
//! bytes, no whitespace, serde_json's string escaping). The format is written down in
//! `docs/cache-key.md` with test vectors; a test here keeps the two in step.
//!
//! The static key covers what the compiler knows: the rendered command, its environment,
//! working directory, image and the container options that change a result (limits,
//! network, user, mounts, platform, the builder's services), declared inputs and outputs, the
//! key of the step before it in the builder and the keys of the builders it needs. At run time the master adds the git
//! tree ids of the inputs, the env allow-list's values, the image digest and the platform
//! (`master/src/cache/key.rs`), and keeps this document to say what changed.

use rbb_schema::pipeline::Mount;
use rbb_schema::plan::{Plan, PlanBuilder, PlanHealth, PlanService, PlanStep};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Identifies this encoding; bump it when the fields change.
pub const STEP_KEY_FORMAT: &str = "rbb-step-key/1";

/// The static cache key of `step`; `services` are its builder's.
pub fn step_key(step: &PlanStep, services: &[PlanService], previous: Option<&str>, upstream: &[String]) -> String {
    let doc = KeyDoc::new(step, services, previous, upstream);
    let mut hasher = HashWriter(Sha256::new());
    // KeyDoc's fields are declared in byte order, so its compact JSON is canonical.
    let _ = serde_json::to_writer(&mut hasher, &doc);
    hex(hasher.0.finalize().as_slice())
}

/// The document hashed by [`step_key`] (shown by "why did this re-run?"): `step_key` is
/// `sha256(canonical_json(step_key_document(..)))`, both built from the same fields.
pub fn step_key_document(
    step: &PlanStep,
    services: &[PlanService],
    previous: Option<&str>,
    upstream: &[String],
) -> Value {
    serde_json::to_value(KeyDoc::new(step, services, previous, upstream)).unwrap_or(Value::Null)
}

/// The key document of step `index` of `builder`, rebuilt from a compiled plan: `after` is
/// the previous step's key, `needs` the keys `last_key` gives for the builders it needs (the
/// key of each one's last step; `None` for a builder without steps). Hashing it gives the
/// step's `key` when the plan was compiled with this format. `None` when there is no such step.
pub fn plan_step_document<'k>(
    builder: &PlanBuilder,
    index: usize,
    last_key: impl Fn(&str) -> Option<&'k str>,
) -> Option<Value> {
    let step = builder.steps.get(index)?;
    let previous = index.checked_sub(1).map(|i| builder.steps[i].key.as_str());
    let upstream: Vec<String> = builder.needs.iter().filter_map(|id| last_key(id)).map(str::to_owned).collect();
    Some(step_key_document(step, &builder.services, previous, &upstream))
}

/// The key of the last step of every builder of `plan`, by builder id (for
/// [`plan_step_document`]).
pub fn last_keys(plan: &Plan) -> std::collections::BTreeMap<&str, &str> {
    plan.builders.iter().filter_map(|b| b.steps.last().map(|s| (b.id.as_str(), s.key.as_str()))).collect()
}

/// The key document, fields in the byte order of their names.
#[derive(serde::Serialize)]
struct KeyDoc<'a> {
    after: Option<&'a str>,
    /// Only for a step with an image that sets a container option: steps without any keep
    /// the key they had before these options existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerDoc<'a>>,
    env: &'a std::collections::BTreeMap<String, String>,
    format: &'static str,
    image: Option<&'a str>,
    inputs: &'a [String],
    needs: Vec<&'a str>,
    outputs: &'a [String],
    pass_env: &'a [String],
    run: &'a str,
    workdir: Option<&'a str>,
}

/// The container options that change what a step computes, fields in byte order.
#[derive(serde::Serialize)]
struct ContainerDoc<'a> {
    cpus_milli: Option<u32>,
    memory_bytes: Option<u64>,
    mounts: &'a [Mount],
    network: Option<&'a str>,
    platform: Option<&'a str>,
    services: Vec<ServiceDoc<'a>>,
    user: Option<&'a str>,
}

/// A service in a key document, fields in byte order (`PlanHealth`'s are already).
#[derive(serde::Serialize)]
struct ServiceDoc<'a> {
    command: Option<&'a str>,
    env: &'a std::collections::BTreeMap<String, String>,
    health: Option<&'a PlanHealth>,
    image: &'a str,
    name: &'a str,
}

impl<'a> ContainerDoc<'a> {
    fn new(step: &'a PlanStep, services: &'a [PlanService]) -> Option<ContainerDoc<'a>> {
        let set = step.memory_bytes.is_some()
            || step.cpus_milli.is_some()
            || step.network.is_some()
            || step.user.is_some()
            || step.platform.is_some()
            || !step.mounts.is_empty()
            || !services.is_empty();
        (step.image.is_some() && set).then(|| ContainerDoc {
            cpus_milli: step.cpus_milli,
            memory_bytes: step.memory_bytes,
            mounts: &step.mounts,
            network: step.network.as_deref(),
            platform: step.platform.as_deref(),
            services: services
                .iter()
                .map(|s| ServiceDoc {
                    command: s.command.as_deref(),
                    env: &s.env,
                    health: s.health.as_ref(),
                    image: &s.image,
                    name: &s.name,
                })
                .collect(),
            user: step.user.as_deref(),
        })
    }
}

impl<'a> KeyDoc<'a> {
    fn new(
        step: &'a PlanStep,
        services: &'a [PlanService],
        previous: Option<&'a str>,
        upstream: &'a [String],
    ) -> KeyDoc<'a> {
        let mut needs: Vec<&str> = upstream.iter().map(String::as_str).filter(|k| !k.is_empty()).collect();
        needs.sort_unstable();
        needs.dedup();
        KeyDoc {
            after: previous,
            container: ContainerDoc::new(step, services),
            env: &step.env,
            format: STEP_KEY_FORMAT,
            image: step.image.as_deref(),
            inputs: &step.inputs,
            needs,
            outputs: &step.outputs,
            pass_env: &step.pass_env,
            run: &step.run,
            workdir: step.workdir.as_deref(),
        }
    }
}

/// The fields of two key documents that differ, named for people: a top-level field by its
/// name (`run`, `inputs`, `after`, `needs`, ...), a changed entry of an object field by
/// `field.entry` (`env.CC`). Sorted by field name; empty when the documents are equal.
/// A side that is not an object (a document that could not be read) differs as a whole,
/// named `document`.
pub fn document_changes(old: &Value, new: &Value) -> Vec<String> {
    if old == new {
        return Vec::new();
    }
    let (Value::Object(o), Value::Object(n)) = (old, new) else {
        return vec!["document".to_owned()];
    };
    let mut fields: Vec<&String> = o.keys().chain(n.keys()).collect();
    fields.sort_unstable();
    fields.dedup();
    let mut out = Vec::new();
    for f in fields {
        let (a, b) = (o.get(f).unwrap_or(&Value::Null), n.get(f).unwrap_or(&Value::Null));
        if a == b {
            continue;
        }
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
                names.sort_unstable();
                names.dedup();
                out.extend(names.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("{f}.{k}")));
            }
            _ => out.push(f.clone()),
        }
    }
    out
}

struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hash of what a plan runs: the plan's compact JSON (published field order) with `hash`
/// empty, every builder's `source` zeroed, and repositories' `commit` and `pipeline_blob`
/// left out. It changes when what runs changes, not when a line moves.
pub fn plan_hash(plan: &Plan) -> String {
    let mut hasher = HashWriter(Sha256::new());
    let repos: Vec<_> = plan
        .repos
        .iter()
        .map(|r| rbb_schema::plan::PlanRepo { commit: None, pipeline_blob: None, ..r.clone() })
        .collect();
    let _ = serde_json::to_writer(&mut hasher, &(plan.format, &repos));
    for b in &plan.builders {
        let mut b = b.clone();
        b.source = Default::default();
        let _ = serde_json::to_writer(&mut hasher, &b);
    }
    hex(hasher.0.finalize().as_slice())
}

fn hex(digest: &[u8]) -> String {
    format!("sha256:{}", rbb_schema::hex(digest))
}

/// `sha256:<lowercase hex>` of `text`.
pub fn sha256(text: &str) -> String {
    hex(Sha256::digest(text.as_bytes()).as_slice())
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
            secrets: BTreeMap::new(),
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
            inputs: vec!["src".into()],
            outputs: vec![],
            cache: true,
            key: String::new(),
        }
    }

    /// The test vectors of docs/cache-key.md.
    #[test]
    fn documented_vectors() {
        let s = step("make");
        // The streamed encoding is the canonical JSON of the document.
        let doc = step_key_document(&s, &[], None, &[]);
        assert_eq!(step_key(&s, &[], None, &[]), sha256(&canonical_json(&doc)));
        assert_eq!(
            canonical_json(&step_key_document(&s, &[], None, &[])),
            r#"{"after":null,"env":{"A":"1","B":"2"},"format":"rbb-step-key/1","image":null,"inputs":["src"],"needs":[],"outputs":[],"pass_env":[],"run":"make","workdir":null}"#
        );
        let docs = include_str!("../../docs/cache-key.md");
        let first = step_key(&s, &[], None, &[]);
        assert!(docs.contains(&first), "docs/cache-key.md lacks vector {first}");
        let second = step_key(&step("make test"), &[], Some(&first), &[]);
        assert!(docs.contains(&second), "docs/cache-key.md lacks vector {second}");
    }

    #[test]
    fn document_changes_name_fields_and_env_entries() {
        let a = step("make");
        let mut b = step("make test");
        b.env.insert("A".into(), "3".into());
        b.env.insert("C".into(), "4".into());
        b.inputs.push("lib".into());
        let (da, db) = (step_key_document(&a, &[], None, &[]), step_key_document(&b, &[], Some("sha256:00"), &[]));
        assert_eq!(document_changes(&da, &db), ["after", "env.A", "env.C", "inputs", "run"]);
        assert!(document_changes(&da, &da).is_empty());
        assert_eq!(document_changes(&Value::Null, &da), ["document"]);
    }

    #[test]
    fn name_timeout_and_flags_do_not_change_the_key() {
        let a = step("make");
        let mut b = step("make");
        b.name = "other".into();
        b.timeout_secs = 5;
        b.halt_on_failure = false;
        assert_eq!(step_key(&a, &[], None, &[]), step_key(&b, &[], None, &[]));
        b.run = "make all".into();
        assert_ne!(step_key(&a, &[], None, &[]), step_key(&b, &[], None, &[]));
        assert_ne!(step_key(&a, &[], None, &[]), step_key(&a, &[], Some("sha256:00"), &[]));
        assert_eq!(
            step_key(&a, &[], None, &["sha256:1".into(), "sha256:2".into()]),
            step_key(&a, &[], None, &["sha256:2".into(), "sha256:1".into()])
        );
    }

    #[test]
    fn container_options_are_in_the_key_and_absent_ones_change_nothing() {
        let mut plain = step("make");
        plain.image = Some("alpine:3".into());
        let doc = canonical_json(&step_key_document(&plain, &[], None, &[]));
        assert!(!doc.contains("container"), "{doc}");
        let base = step_key(&plain, &[], None, &[]);
        let service = PlanService {
            name: "db".into(),
            image: "postgres:16".into(),
            env: BTreeMap::new(),
            command: None,
            health: Some(PlanHealth { command: "true".into(), interval_ms: 1000, retries: 3, timeout_ms: 5000 }),
        };
        type Change = fn(&mut PlanStep);
        let variants: [(&str, Change); 6] = [
            ("memory", |s| s.memory_bytes = Some(1 << 30)),
            ("cpus", |s| s.cpus_milli = Some(1500)),
            ("network", |s| s.network = Some("none".into())),
            ("user", |s| s.user = Some("1000".into())),
            ("platform", |s| s.platform = Some("linux/arm64".into())),
            ("mounts", |s| s.mounts = vec![Mount { source: "/srv/data".into(), target: "/data".into() }]),
        ];
        let mut seen = std::collections::BTreeSet::from([base.clone()]);
        for (what, change) in &variants {
            let mut s = plain.clone();
            change(&mut s);
            let key = step_key(&s, &[], None, &[]);
            assert!(seen.insert(key), "{what} does not change the key");
            // Without an image the options mean nothing (the compiler refuses them anyway).
            s.image = None;
            let mut native = plain.clone();
            native.image = None;
            assert_eq!(step_key(&s, &[], None, &[]), step_key(&native, &[], None, &[]), "{what}");
        }
        let with_service = step_key(&plain, std::slice::from_ref(&service), None, &[]);
        assert!(seen.insert(with_service.clone()));
        let mut other = service.clone();
        other.health = Some(PlanHealth { command: "true".into(), interval_ms: 1000, retries: 4, timeout_ms: 5000 });
        assert_ne!(step_key(&plain, &[other], None, &[]), with_service);
        let doc = canonical_json(&step_key_document(&plain, &[service], None, &[]));
        assert!(doc.contains(r#""container":{"cpus_milli":null,"memory_bytes":null,"mounts":[],"network":null,"platform":null,"services":[{"command":null,"env":{},"health":{"command":"true","interval_ms":1000,"retries":3,"timeout_ms":5000},"image":"postgres:16","name":"db"}],"user":null}"#), "{doc}");
        let docs = include_str!("../../docs/cache-key.md");
        let mut vector = plain.clone();
        vector.memory_bytes = Some(512 << 20);
        let key = step_key(&vector, &[], None, &[]);
        assert!(docs.contains(&key), "docs/cache-key.md lacks vector {key}");
    }
}
