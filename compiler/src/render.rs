//! Renders a plan for people: a text tree and a Graphviz DOT picture. (JSON is the serde
//! form of [`rbb_schema::plan::Plan`].) Rendering is deterministic and reads nothing else.

use crate::duration::format_duration;
use rbb_schema::plan::{Plan, PlanBranchFilter, PlanBuilder, PlanTriggers};
use std::fmt::Write as _;

/// The plan as an indented text tree, repository by repository.
pub fn text(plan: &Plan) -> String {
    let mut out = String::new();
    let steps = plan.step_count();
    let _ = writeln!(
        out,
        "plan {} ({} repositories, {} builders, {} steps)",
        short(&plan.hash),
        plan.repos.len(),
        plan.builders.len(),
        steps
    );
    for repo in &plan.repos {
        let _ = writeln!(out);
        let mut origin = format!("branch {}", repo.branch);
        if let Some(c) = &repo.commit {
            let _ = write!(origin, " @ {}", &c[..c.len().min(12)]);
        }
        let _ = writeln!(out, "repository {} ({origin})", repo.name);
        for b in plan.builders.iter().filter(|b| b.repo == repo.name) {
            builder(&mut out, b);
        }
    }
    out
}

fn builder(out: &mut String, b: &PlanBuilder) {
    let _ = writeln!(out, "  builder {}", b.id);
    if let Some(d) = &b.description {
        let _ = writeln!(out, "    description: {d}");
    }
    let mut worker = Vec::new();
    if !b.labels.is_empty() {
        worker.push(format!("labels [{}]", b.labels.join(", ")));
    }
    if let Some(i) = &b.image {
        worker.push(format!("image {i}"));
    }
    if !worker.is_empty() {
        let _ = writeln!(out, "    runs on: {}", worker.join(", "));
    }
    if !b.services.is_empty() {
        let services: Vec<String> = b.services.iter().map(|s| format!("{} ({})", s.name, s.image)).collect();
        let _ = writeln!(out, "    services: {}", services.join(", "));
    }
    let _ = writeln!(out, "    on: {}", triggers(&b.triggers));
    if !b.needs.is_empty() {
        let _ = writeln!(out, "    needs: {}", b.needs.join(", "));
    }
    if b.priority != 0 {
        let _ = writeln!(out, "    priority: {}", b.priority);
    }
    if !b.tags.is_empty() {
        let _ = writeln!(out, "    tags: {}", b.tags.join(", "));
    }
    let mut secrets: Vec<&str> = b.steps.iter().flat_map(|s| s.secret_names()).collect();
    secrets.sort_unstable();
    secrets.dedup();
    if !secrets.is_empty() {
        let _ = writeln!(out, "    secrets: {}", secrets.join(", "));
    }
    for (i, s) in b.steps.iter().enumerate() {
        let first_line = s.run.lines().next().unwrap_or("");
        let more = if s.run.trim_end().lines().count() > 1 { " …" } else { "" };
        let _ = writeln!(out, "    {}. {}: {first_line}{more}", i + 1, s.name);
        let mut flags = Vec::new();
        if !s.halt_on_failure {
            flags.push("continue on failure".to_owned());
        }
        if !s.flunk_on_failure {
            flags.push("failure does not fail the build".to_owned());
        }
        if s.warn_on_failure {
            flags.push("warn on failure".to_owned());
        }
        if s.always_run {
            flags.push("always run".to_owned());
        }
        if let Some(c) = &s.condition {
            flags.push(format!("if {c}"));
        }
        flags.push(format!("timeout {}", format_duration(s.timeout_secs)));
        if let Some(w) = &s.workdir {
            flags.push(format!("in {w}"));
        }
        if s.image != b.image
            && let Some(img) = &s.image
        {
            flags.push(format!("image {img}"));
        }
        if let Some(m) = s.memory_bytes {
            flags.push(format!("memory {}", format_memory(m)));
        }
        if let Some(c) = s.cpus_milli {
            flags.push(format!("cpus {}", f64::from(c) / 1000.0));
        }
        if let Some(n) = &s.network {
            flags.push(format!("network {n}"));
        }
        if let Some(u) = &s.user {
            flags.push(format!("user {u}"));
        }
        if !s.env.is_empty() {
            let keys: Vec<&str> = s.env.keys().map(String::as_str).collect();
            flags.push(format!("env {}", keys.join(",")));
        }
        if !s.secrets.is_empty() {
            let uses: Vec<String> = s.secrets.iter().map(|(var, names)| format!("{var}←{}", names.join("+"))).collect();
            flags.push(format!("secrets {}", uses.join(",")));
        }
        if !s.inputs.is_empty() {
            flags.push(format!("inputs {}", s.inputs.join(",")));
        }
        if !s.outputs.is_empty() {
            flags.push(format!("outputs {}", s.outputs.join(",")));
        }
        let _ = writeln!(out, "       {} · key {}", flags.join(" · "), short(&s.key));
    }
}

fn filter(f: &PlanBranchFilter) -> String {
    let mut s = if f.branches.is_empty() { "any branch".to_owned() } else { f.branches.join(", ") };
    if !f.branches_ignore.is_empty() {
        let _ = write!(s, " except {}", f.branches_ignore.join(", "));
    }
    s
}

/// One line saying what starts a builder.
pub fn triggers(t: &PlanTriggers) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &t.push {
        parts.push(format!("push ({})", filter(p)));
    }
    if let Some(p) = &t.pull_request {
        parts.push(format!("pull request ({})", filter(p)));
    }
    for s in &t.schedule {
        let cond = if s.only_if_changed { ", if changed" } else { "" };
        parts.push(format!("schedule \"{}\" on {}{cond}", s.cron, s.branch));
    }
    if t.force {
        parts.push("force".to_owned());
    }
    let mut line = if parts.is_empty() { "nothing".to_owned() } else { parts.join(", ") };
    if !t.paths.is_empty() {
        let _ = write!(line, "; paths {}", t.paths.join(", "));
    }
    if !t.paths_ignore.is_empty() {
        let _ = write!(line, "; ignoring {}", t.paths_ignore.join(", "));
    }
    line
}

/// The plan as a Graphviz digraph: one cluster per repository, an arrow per `needs`
/// (from the builder needed to the one that waits).
pub fn dot(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph rbb {{");
    let _ = writeln!(
        out,
        "  graph [rankdir=LR, fontname=\"sans-serif\", label={}];",
        quote(&format!("plan {}", short(&plan.hash)))
    );
    let _ =
        writeln!(out, "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#eef3fb\", fontname=\"sans-serif\"];");
    for (i, repo) in plan.repos.iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_{i} {{");
        let _ = writeln!(out, "    label={};", quote(&repo.name));
        let _ = writeln!(out, "    style=rounded; color=\"#8899aa\";");
        for b in plan.builders.iter().filter(|b| b.repo == repo.name) {
            let label = format!(
                "{}\n{} step{}",
                b.id.split_once('/').map(|(_, n)| n).unwrap_or(&b.id),
                b.steps.len(),
                if b.steps.len() == 1 { "" } else { "s" }
            );
            let _ = writeln!(out, "    {} [label={}];", quote(&b.id), quote(&label));
        }
        let _ = writeln!(out, "  }}");
    }
    for b in &plan.builders {
        for n in &b.needs {
            let _ = writeln!(out, "  {} -> {};", quote(n), quote(&b.id));
        }
    }
    let _ = writeln!(out, "}}");
    out
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `sha256:0123456789ab…` → `0123456789ab`.
pub fn short(hash: &str) -> &str {
    let h = hash.strip_prefix("sha256:").unwrap_or(hash);
    &h[..h.len().min(12)]
}

/// `512m`, `1g`, or bytes when not a whole number of KiB.
fn format_memory(bytes: u64) -> String {
    for (shift, unit) in [(30, "g"), (20, "m"), (10, "k")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}
