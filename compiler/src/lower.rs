//! Lowering: a typed builder definition to plan builders (one per matrix combination), with
//! every default applied, every `${{ matrix.x }}` substituted and every string-encoded value
//! (durations, globs, cron, conditions) checked.
//!
//! `needs` stay unresolved names here; resolving them needs every repository ([`crate::merge`]).

use crate::Options;
use crate::condition;
use crate::cron::Cron;
use crate::diagnostic::{Diagnostics, did_you_mean, name_list};
use crate::duration::parse_duration;
use crate::parse::{FileCtx, ParsedBuilder, json_kind, run_snippet, valid_name};
use crate::snippet::Evaluator;
use crate::spans::{Pos, Seg, key};
use indexmap::IndexMap;
use rbb_schema::pipeline::{BranchFilter, Matrix, Mount, Scalar};
use rbb_schema::plan::{
    PlanBranchFilter, PlanBuilder, PlanHealth, PlanSchedule, PlanService, PlanStep, PlanTriggers, SourceLocation,
};
use std::collections::{BTreeMap, BTreeSet};

/// A plan builder before `needs` are resolved and keys computed.
#[derive(Debug, Clone)]
pub(crate) struct Lowered {
    pub builder: PlanBuilder,
    /// `needs` as written, each with its position.
    pub needs: Vec<(String, Pos)>,
    /// Index of the source file this came from.
    pub file: usize,
}

pub(crate) fn lower(
    ctx: &FileCtx,
    file: usize,
    b: &ParsedBuilder,
    eval: &dyn Evaluator,
    opts: &Options,
    diags: &mut Diagnostics,
) -> Vec<Lowered> {
    let spec = &b.spec;
    let repo = &ctx.src.repo;
    let what = format!("builder `{}`", b.name);
    let start = b.pos(ctx, &[]);
    let errors_before = diags.error_count();

    if spec.steps.is_empty() {
        diags.push(ctx.diag(
            "no-steps",
            start,
            format!("{what} has no steps"),
            Some("add `steps:` with at least one `- run: <command>`".into()),
        ));
        return Vec::new();
    }

    let combos = match &spec.matrix {
        None => vec![IndexMap::new()],
        Some(m) => match expand_matrix(ctx, b, m, eval, opts, diags) {
            Some(c) => c,
            None => return Vec::new(),
        },
    };

    let triggers = lower_triggers(ctx, b, diags);
    let builder_timeout = spec.timeout.as_ref().and_then(|t| duration(ctx, b, &[key("timeout")], t, diags));

    check_secret_places(ctx, b, diags);

    let mut step_names = BTreeSet::new();
    for (i, step) in spec.steps.iter().enumerate() {
        let at = |k: &str| vec![key("steps"), Seg::Index(i), key(k)];
        if let Some(name) = &step.name
            && !step_names.insert(name.clone())
        {
            diags.push(ctx.diag(
                "duplicate-step",
                b.pos(ctx, &at("name")),
                format!("{what} has two steps named `{name}`"),
                Some("step names are unique within a builder".into()),
            ));
        }
        if step.run.trim().is_empty() {
            diags.push(ctx.diag(
                "empty-run",
                b.pos(ctx, &at("run")),
                format!("step {} of {what} has an empty `run`", i + 1),
                None,
            ));
        }
        if let Some(cond) = &step.condition
            && secret_refs(cond).is_empty()
            && let Err(e) = condition::parse(cond)
        {
            let p = b.pos(ctx, &at("if"));
            let quoted = ctx
                .src
                .text
                .lines()
                .nth(p.line.saturating_sub(1) as usize)
                .and_then(|l| l.chars().nth(p.col.saturating_sub(1) as usize).map(|c| c == '"' || c == '\''));
            let shift = if quoted == Some(true) { 1 } else { 0 };
            diags.push(ctx.diag(
                "bad-condition",
                Pos { line: p.line, col: p.col + shift + e.offset as u32 },
                format!("in the `if:` of step {} of {what}: {}", i + 1, e.message),
                Some("example: if: \"branch == 'main' && event != 'pull_request'\"".into()),
            ));
        }
        for (k, _) in &step.env {
            check_env_name(ctx, b, &at("env"), k, diags);
        }
        for k in &step.pass_env {
            check_env_name(ctx, b, &at("pass_env"), k, diags);
        }
        check_relative(ctx, b, &at("workdir"), step.workdir.as_deref(), diags);
        for (j, p) in step.inputs.iter().enumerate() {
            let mut path = at("inputs");
            path.push(Seg::Index(j));
            check_relative(ctx, b, &path, Some(p), diags);
        }
        for (j, p) in step.outputs.iter().enumerate() {
            let mut path = at("outputs");
            path.push(Seg::Index(j));
            check_relative(ctx, b, &path, Some(p), diags);
        }
    }
    for (k, _) in &spec.env {
        check_env_name(ctx, b, &[key("env")], k, diags);
    }
    check_relative(ctx, b, &[key("workdir")], spec.workdir.as_deref(), diags);
    let builder_limits = container_limits(ctx, b, &[], &ContainerKeys::of_builder(spec), diags);
    let step_limits: Vec<Limits> = spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let own = container_limits(ctx, b, &[key("steps"), Seg::Index(i)], &ContainerKeys::of_step(s), diags);
            let limits = Limits {
                memory_bytes: own.memory_bytes.or(builder_limits.memory_bytes),
                cpus_milli: own.cpus_milli.or(builder_limits.cpus_milli),
                network: own.network.clone().or_else(|| builder_limits.network.clone()),
                user: own.user.clone().or_else(|| builder_limits.user.clone()),
                mounts: own.mounts.clone().or_else(|| builder_limits.mounts.clone()),
                platform: own.platform.clone().or_else(|| builder_limits.platform.clone()),
            };
            if s.image.is_none() && spec.image.is_none() && limits != Limits::default() {
                let rel: Vec<Seg> = if own == Limits::default() {
                    vec![key(ContainerKeys::of_builder(spec).first_set().unwrap_or("memory"))]
                } else {
                    vec![key("steps"), Seg::Index(i), key(ContainerKeys::of_step(s).first_set().unwrap_or("memory"))]
                };
                diags.push(ctx.diag(
                    "container-option-without-image",
                    b.key_pos(ctx, &rel),
                    format!("step {} of {what} sets container options but runs without an image", i + 1),
                    Some("`memory`, `cpus`, `network`, `user`, `mounts` and `platform` apply to containers: add `image:`".into()),
                ));
            }
            if !spec.services.is_empty()
                && (s.image.is_some() || spec.image.is_some())
                && let Some(net @ ("none" | "host")) = limits.network.as_deref()
            {
                let rel: Vec<Seg> = if own.network.is_some() {
                    vec![key("steps"), Seg::Index(i), key("network")]
                } else {
                    vec![key("network")]
                };
                diags.push(ctx.diag(
                    "services-need-network",
                    b.pos(ctx, &rel),
                    format!("step {} of {what} uses `network: {net}`, which cannot reach the builder's services", i + 1),
                    Some("leave `network` out: containers join the build's network with its services".into()),
                ));
            }
            limits
        })
        .collect();
    let services = lower_services(ctx, b, diags);
    if !spec.services.is_empty() && spec.image.is_none() && spec.steps.iter().all(|s| s.image.is_none()) {
        diags.push(ctx.diag(
            "services-without-image",
            b.key_pos(ctx, &[key("services")]),
            format!("{what} has services but none of its steps runs in a container"),
            Some(
                "services are reached over the build's container network: add `image:` to the builder or a step".into(),
            ),
        ));
    }
    let step_timeouts: Vec<Option<u64>> = spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.timeout.as_ref().and_then(|t| duration(ctx, b, &[key("steps"), Seg::Index(i), key("timeout")], t, diags))
        })
        .collect();

    if let Some(known) = &opts.locks {
        for (i, l) in spec.locks.iter().enumerate() {
            if !known.iter().any(|k| k == &l.name) {
                diags.push(ctx.diag(
                    "unknown-lock",
                    b.pos(ctx, &[key("locks"), Seg::Index(i), key("name")]),
                    format!("{what} takes lock `{}`, which the master config does not declare", l.name),
                    did_you_mean(&l.name, known.iter().map(String::as_str)).or_else(|| {
                        Some(format!(
                            "declare it under `locks:` in the master config (declared: {})",
                            name_list(known, 10)
                        ))
                    }),
                ));
            }
        }
    }
    if spec.concurrency == Some(0) {
        diags.push(ctx.diag(
            "bad-concurrency",
            b.pos(ctx, &[key("concurrency")]),
            format!("`concurrency: 0` would never let {what} run"),
            Some("use 1 or more, or leave it out".into()),
        ));
    }
    if let Some(workers) = &opts.worker_labels
        && !spec.labels.is_empty()
        && !workers.is_empty()
    {
        let wanted: BTreeSet<&str> = spec.labels.iter().map(String::as_str).collect();
        let any = workers.iter().any(|w| wanted.iter().all(|l| w.iter().any(|x| x == l)));
        if !any && !spec.labels.iter().any(|l| l.contains("${{")) {
            diags.push(ctx.warn(
                "no-capable-worker",
                b.pos(ctx, &[key("labels")]),
                format!("no configured worker has all labels of {what}: {}", spec.labels.join(", ")),
                Some("add the labels to a worker in the master config, or change `labels:`".into()),
            ));
        }
    }

    if diags.error_count() > errors_before {
        return Vec::new();
    }

    let needs: Vec<(String, Pos)> =
        spec.needs.0.iter().enumerate().map(|(i, n)| (n.clone(), b.pos(ctx, &[key("needs"), Seg::Index(i)]))).collect();

    let mut out = Vec::new();
    let mut subst_errors = BTreeSet::new();
    for combo in combos {
        // `used` is `Some` for an env value, where `${{ secrets.NAME }}` may appear: it stays
        // in the value and its name is collected.
        let mut sub_in = |s: &str, rel: &[Seg], used: Option<&mut Vec<String>>| -> String {
            let in_env = used.is_some();
            let mut found = Vec::new();
            let result = substitute(s, &combo, in_env.then_some(&mut found));
            for name in &found {
                if let Some(why) = secret_refused(opts, repo, name)
                    && subst_errors.insert(format!("secret {name}"))
                {
                    let usable = usable_secrets(opts, repo);
                    let listed = format!(
                        "secrets repository `{repo}` may use: {} (declared under `secrets:` in the master config)",
                        name_list(&usable, 10)
                    );
                    let hint = match did_you_mean(name, usable.iter().map(String::as_str)) {
                        Some(close) => format!("{close} {listed}"),
                        None => listed,
                    };
                    diags.push(ctx.diag("unknown-secret", b.pos(ctx, rel), format!("{what} uses {why}"), Some(hint)));
                }
            }
            if let Some(used) = used {
                used.extend(found);
            }
            match result {
                Ok(v) => v,
                Err(msg) => {
                    if subst_errors.insert(msg.clone()) {
                        diags.push(ctx.diag(
                            "bad-expression",
                            b.pos(ctx, rel),
                            format!("{msg} in {what}"),
                            Some(if msg.contains("does not name a secret") {
                                "write `${{ secrets.NAME }}` with a name declared under `secrets:` in the master config"
                                    .into()
                            } else if combo.is_empty() {
                                "`${{ matrix.<axis> }}` works only in a builder with `matrix:`".into()
                            } else {
                                format!("axes of this matrix: {}", combo.keys().cloned().collect::<Vec<_>>().join(", "))
                            }),
                        ));
                    }
                    s.to_owned()
                }
            }
        };
        let mut builder_env = BTreeMap::new();
        let mut builder_secrets: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in &spec.env {
            let mut used = Vec::new();
            builder_env.insert(k.clone(), sub_in(v.as_str(), &[key("env"), key(k)], Some(&mut used)));
            if !used.is_empty() {
                builder_secrets.insert(k.clone(), sorted(used));
            }
        }
        let image = spec.image.as_ref().map(|i| sub_in(i, &[key("image")], None));
        let builder_workdir = spec.workdir.as_ref().map(|w| sub_in(w, &[key("workdir")], None));
        let mut labels: Vec<String> = spec.labels.iter().map(|l| sub_in(l, &[key("labels")], None)).collect();
        labels.sort();
        labels.dedup();
        let description = spec.description.as_ref().map(|d| sub_in(d, &[key("description")], None));
        let mut steps = Vec::new();
        for (i, step) in spec.steps.iter().enumerate() {
            let at = |k: &str| vec![key("steps"), Seg::Index(i), key(k)];
            let mut env = builder_env.clone();
            let mut secrets = builder_secrets.clone();
            for (k, v) in &step.env {
                let mut used = Vec::new();
                let mut rel = at("env");
                rel.push(key(k));
                env.insert(k.clone(), sub_in(v.as_str(), &rel, Some(&mut used)));
                if used.is_empty() {
                    secrets.remove(k);
                } else {
                    secrets.insert(k.clone(), sorted(used));
                }
            }
            let name = match &step.name {
                Some(n) => sub_in(n, &at("name"), None),
                None => format!("step-{}", i + 1),
            };
            steps.push(PlanStep {
                name,
                run: sub_in(&step.run, &at("run"), None),
                env,
                secrets,
                pass_env: step.pass_env.clone(),
                workdir: step
                    .workdir
                    .as_ref()
                    .map(|w| sub_in(w, &at("workdir"), None))
                    .or_else(|| builder_workdir.clone()),
                timeout_secs: step_timeouts[i].or(builder_timeout).unwrap_or(opts.default_timeout_secs),
                halt_on_failure: step.halt_on_failure.unwrap_or(true),
                flunk_on_failure: step.flunk_on_failure.unwrap_or(true),
                warn_on_failure: step.warn_on_failure.unwrap_or(false),
                always_run: step.always_run.unwrap_or(false),
                condition: step.condition.as_ref().map(|c| sub_in(c, &at("if"), None)),
                image: step.image.as_ref().map(|i| sub_in(i, &at("image"), None)).or_else(|| image.clone()),
                memory_bytes: step_limits[i].memory_bytes,
                cpus_milli: step_limits[i].cpus_milli,
                network: step_limits[i].network.clone(),
                user: step_limits[i].user.clone(),
                mounts: step_limits[i].mounts.clone().unwrap_or_default(),
                platform: step_limits[i].platform.clone(),
                inputs: step.inputs.iter().map(|p| sub_in(p, &at("inputs"), None)).collect(),
                outputs: step.outputs.iter().map(|p| sub_in(p, &at("outputs"), None)).collect(),
                cache: step.cache.unwrap_or(true),
                key: String::new(),
            });
        }
        let id = if combo.is_empty() {
            format!("{repo}/{}", b.name)
        } else {
            let parts: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{repo}/{}[{}]", b.name, parts.join(","))
        };
        out.push(Lowered {
            builder: PlanBuilder {
                id,
                repo: repo.clone(),
                name: b.name.clone(),
                description,
                tags: spec.tags.clone(),
                matrix: combo.clone(),
                labels,
                image,
                services: services
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, s)| {
                        let at = |k: &str| vec![key("services"), Seg::Index(j), key(k)];
                        PlanService {
                            name: s.name.clone(),
                            image: sub_in(&s.image, &at("image"), None),
                            env: s.env.iter().map(|(k, v)| (k.clone(), sub_in(v, &at("env"), None))).collect(),
                            command: s.command.as_ref().map(|c| sub_in(c, &at("command"), None)),
                            health: s.health.clone(),
                        }
                    })
                    .collect(),
                priority: spec.priority.unwrap_or(0),
                collapse: spec.collapse.unwrap_or(true),
                cancel_superseded: spec.cancel_superseded.unwrap_or(false),
                concurrency: spec.concurrency,
                locks: spec.locks.clone(),
                cache_salt: spec.cache_salt.as_ref().map(|s| sub_in(s.as_str(), &[key("cache_salt")], None)),
                triggers: triggers.clone(),
                needs: Vec::new(),
                steps,
                source: SourceLocation { file: ctx.src.file.clone(), line: start.line, col: start.col },
            },
            needs: needs.clone(),
            file,
        });
    }
    out
}

fn check_env_name(ctx: &FileCtx, b: &ParsedBuilder, rel: &[Seg], name: &str, diags: &mut Diagnostics) {
    if !crate::parse::valid_env_name(name) {
        let mut p = rel.to_vec();
        p.push(key(name));
        diags.push(ctx.diag(
            "bad-env-name",
            b.key_pos(ctx, &p),
            format!("`{name}` is not a valid environment variable name in builder `{}`", b.name),
            Some("use letters, digits and `_`, not starting with a digit".into()),
        ));
    }
}

fn check_relative(ctx: &FileCtx, b: &ParsedBuilder, rel: &[Seg], path: Option<&str>, diags: &mut Diagnostics) {
    let Some(path) = path else { return };
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        diags.push(ctx.diag(
            "bad-path",
            b.pos(ctx, rel),
            format!("`{path}` in builder `{}` leaves the checkout", b.name),
            Some("paths are relative to the repository root and may not use `..`".into()),
        ));
    }
}

/// The container options of a builder or a step, as written.
struct ContainerKeys<'a> {
    memory: Option<&'a Scalar>,
    cpus: Option<&'a Scalar>,
    network: Option<&'a str>,
    user: Option<&'a str>,
    mounts: Option<&'a [Mount]>,
    platform: Option<&'a str>,
}

impl<'a> ContainerKeys<'a> {
    fn of_builder(b: &'a rbb_schema::pipeline::Builder) -> Self {
        ContainerKeys {
            memory: b.memory.as_ref(),
            cpus: b.cpus.as_ref(),
            network: b.network.as_deref(),
            user: b.user.as_deref(),
            mounts: b.mounts.as_deref(),
            platform: b.platform.as_deref(),
        }
    }

    fn of_step(s: &'a rbb_schema::pipeline::Step) -> Self {
        ContainerKeys {
            memory: s.memory.as_ref(),
            cpus: s.cpus.as_ref(),
            network: s.network.as_deref(),
            user: s.user.as_deref(),
            mounts: s.mounts.as_deref(),
            platform: s.platform.as_deref(),
        }
    }

    fn first_set(&self) -> Option<&'static str> {
        [
            ("memory", self.memory.is_some()),
            ("cpus", self.cpus.is_some()),
            ("network", self.network.is_some()),
            ("user", self.user.is_some()),
            ("mounts", self.mounts.is_some()),
            ("platform", self.platform.is_some()),
        ]
        .into_iter()
        .find_map(|(k, set)| set.then_some(k))
    }
}

/// Container options once checked.
#[derive(Debug, Clone, Default, PartialEq)]
struct Limits {
    memory_bytes: Option<u64>,
    cpus_milli: Option<u32>,
    network: Option<String>,
    user: Option<String>,
    mounts: Option<Vec<Mount>>,
    platform: Option<String>,
}

/// Smallest memory limit the engine accepts (6 MiB).
const MIN_MEMORY: u64 = 6 * 1024 * 1024;
/// Docker's network modes a step may ask for.
const NETWORKS: [&str; 3] = ["bridge", "none", "host"];

fn container_limits(
    ctx: &FileCtx,
    b: &ParsedBuilder,
    at: &[Seg],
    keys: &ContainerKeys<'_>,
    diags: &mut Diagnostics,
) -> Limits {
    let rel = |k: &str| {
        let mut p = at.to_vec();
        p.push(key(k));
        p
    };
    let memory_bytes = keys.memory.and_then(|m| match parse_memory(m.as_str()) {
        Some(bytes) if bytes >= MIN_MEMORY => Some(bytes),
        parsed => {
            let message = match parsed {
                Some(_) => {
                    format!("memory `{}` in builder `{}` is below the engine's minimum of 6m", m.as_str(), b.name)
                }
                None => format!("`{}` is not a memory size in builder `{}`", m.as_str(), b.name),
            };
            diags.push(ctx.diag(
                "bad-memory",
                b.pos(ctx, &rel("memory")),
                message,
                Some("write bytes or a size with `k`, `m` or `g`, e.g. `512m`".into()),
            ));
            None
        }
    });
    let cpus_milli = keys.cpus.and_then(|c| match c.as_str().trim().parse::<f64>() {
        Ok(cpus) if (0.01..=4096.0).contains(&cpus) => Some((cpus * 1000.0).round() as u32),
        _ => {
            diags.push(ctx.diag(
                "bad-cpus",
                b.pos(ctx, &rel("cpus")),
                format!("`{}` is not a CPU count in builder `{}`", c.as_str(), b.name),
                Some("write a number of CPUs, e.g. `2` or `0.5`".into()),
            ));
            None
        }
    });
    let network = keys.network.and_then(|n| {
        if NETWORKS.contains(&n) {
            Some(n.to_owned())
        } else {
            diags.push(ctx.diag(
                "bad-network",
                b.pos(ctx, &rel("network")),
                format!("unknown network `{n}` in builder `{}`", b.name),
                Some(format!("networks: {}", NETWORKS.join(", "))),
            ));
            None
        }
    });
    let user = keys.user.and_then(|u| {
        let ok = !u.is_empty() && u.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
        if ok {
            Some(u.to_owned())
        } else {
            diags.push(ctx.diag(
                "bad-user",
                b.pos(ctx, &rel("user")),
                format!("`{u}` is not a user in builder `{}`", b.name),
                Some("write `uid[:gid]` or a user name of the image".into()),
            ));
            None
        }
    });
    let mounts = keys.mounts.map(|mounts| {
        let mut ok = Vec::new();
        for (j, m) in mounts.iter().enumerate() {
            let mut at = rel("mounts");
            at.push(Seg::Index(j));
            let mut field = |k: &str, message: String, hint: &str| {
                let mut p = at.clone();
                p.push(key(k));
                diags.push(ctx.diag("bad-mount", b.pos(ctx, &p), message, Some(hint.to_owned())));
            };
            let plain = |p: &str| {
                p.starts_with('/') && !p.split('/').any(|c| c == ".." || c == ".") && !p.contains(['\0', ':', ','])
            };
            let mut good = true;
            if !plain(&m.source) {
                field(
                    "source",
                    format!("mount source `{}` in builder `{}` is not a plain absolute path", m.source, b.name),
                    "write an absolute host path without `.`, `..`, `:` or `,`, e.g. `/srv/data`",
                );
                good = false;
            }
            let target = m.target.trim_end_matches('/');
            if !plain(&m.target) || target.is_empty() {
                field(
                    "target",
                    format!("mount target `{}` in builder `{}` is not a plain absolute path", m.target, b.name),
                    "write an absolute path inside the container, e.g. `/data`",
                );
                good = false;
            } else if target == WORKSPACE || target.starts_with(&format!("{WORKSPACE}/")) {
                field(
                    "target",
                    format!(
                        "mount target `{}` in builder `{}` is inside the checkout's `{WORKSPACE}`",
                        m.target, b.name
                    ),
                    "mount it somewhere else, e.g. `/data`",
                );
                good = false;
            }
            if good {
                ok.push(Mount { source: m.source.clone(), target: target.to_owned() });
            }
        }
        ok
    });
    let platform = keys.platform.and_then(|p| {
        let parts: Vec<&str> = p.split('/').collect();
        let word =
            |w: &&str| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if (2..=3).contains(&parts.len()) && parts.iter().all(word) {
            Some(p.to_owned())
        } else {
            diags.push(ctx.diag(
                "bad-platform",
                b.pos(ctx, &rel("platform")),
                format!("`{p}` is not a platform in builder `{}`", b.name),
                Some("write `os/arch` as Docker names it, e.g. `linux/amd64` or `linux/arm64`".into()),
            ));
            None
        }
    });
    Limits { memory_bytes, cpus_milli, network, user, mounts, platform }
}

/// Where the checkout is mounted in containers (a mount may not hide it).
const WORKSPACE: &str = "/workspace";

/// Checks a builder's `services:`: names that are DNS labels and unique, an image, health
/// durations. Returns them lowered (matrix values not yet substituted), or `None` after a
/// diagnostic.
fn lower_services(ctx: &FileCtx, b: &ParsedBuilder, diags: &mut Diagnostics) -> Option<Vec<PlanService>> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let errors_before = diags.error_count();
    for (i, s) in b.spec.services.iter().enumerate() {
        let at = |k: &str| vec![key("services"), Seg::Index(i), key(k)];
        if !dns_label(&s.name) {
            diags.push(ctx.diag(
                "bad-service-name",
                b.pos(ctx, &at("name")),
                format!("service name `{}` in builder `{}` is not a DNS label", s.name, b.name),
                Some("it becomes the service's host name: lowercase letters, digits and `-`, at most 63, not starting or ending with `-`".into()),
            ));
        } else if !names.insert(s.name.clone()) {
            diags.push(ctx.diag(
                "duplicate-service",
                b.pos(ctx, &at("name")),
                format!("builder `{}` has two services named `{}`", b.name, s.name),
                Some("service names are host names on the build's network: make them unique".into()),
            ));
        }
        if s.image.trim().is_empty() {
            diags.push(ctx.diag(
                "bad-service-image",
                b.pos(ctx, &at("image")),
                format!("service `{}` of builder `{}` has an empty `image`", s.name, b.name),
                Some("name the service's Docker image, e.g. `postgres:16`".into()),
            ));
        }
        for (k, _) in &s.env {
            check_env_name(ctx, b, &at("env"), k, diags);
        }
        if s.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            diags.push(ctx.diag(
                "empty-run",
                b.pos(ctx, &at("command")),
                format!("service `{}` of builder `{}` has an empty `command`", s.name, b.name),
                Some("leave `command` out to run the image's own command".into()),
            ));
        }
        let health = s.health.as_ref().map(|h| {
            let hat = |k: &str| {
                let mut p = at("health");
                p.push(key(k));
                p
            };
            if h.command.trim().is_empty() {
                diags.push(ctx.diag(
                    "empty-run",
                    b.pos(ctx, &hat("command")),
                    format!("the health check of service `{}` has an empty `command`", s.name),
                    Some("e.g. `command: nc -z localhost 5432`".into()),
                ));
            }
            if h.retries == Some(0) {
                diags.push(ctx.diag(
                    "bad-retries",
                    b.pos(ctx, &hat("retries")),
                    format!("`retries: 0` would never let service `{}` become healthy", s.name),
                    Some("use 1 or more, or leave it out (default 30)".into()),
                ));
            }
            let mut millis = |k: &str, v: Option<&Scalar>, default: u64| match v {
                None => default,
                Some(v) => match parse_millis(v.as_str()) {
                    Ok(ms) if ms > 0 => ms,
                    Ok(_) | Err(_) => {
                        diags.push(ctx.diag(
                            "bad-duration",
                            b.pos(ctx, &hat(k)),
                            format!("`{}` is not a positive duration in builder `{}`", v.as_str(), b.name),
                            Some("write a duration such as `500ms`, `1s` or `2m`".into()),
                        ));
                        default
                    }
                },
            };
            PlanHealth {
                command: h.command.clone(),
                interval_ms: millis("interval", h.interval.as_ref(), 1000),
                timeout_ms: millis("timeout", h.timeout.as_ref(), 5000),
                retries: h.retries.unwrap_or(30),
            }
        });
        out.push(PlanService {
            name: s.name.clone(),
            image: s.image.clone(),
            env: s.env.iter().map(|(k, v)| (k.clone(), v.as_str().to_owned())).collect(),
            command: s.command.clone(),
            health,
        });
    }
    (diags.error_count() == errors_before).then_some(out)
}

/// A DNS label: 1 to 63 lowercase letters, digits or `-`, not starting or ending with `-`.
fn dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `500ms`, or any duration [`parse_duration`] reads, in milliseconds.
fn parse_millis(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Some(ms) = t.strip_suffix("ms") {
        return ms.parse::<u64>().map_err(|_| format!("`{t}` is not a duration"));
    }
    parse_duration(t).and_then(|s| s.checked_mul(1000).ok_or_else(|| format!("duration `{t}` is too large")))
}

/// `512m`, `1g`, `1048576`, `64k` (powers of 1024; a trailing `b`/`ib` is allowed).
fn parse_memory(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

fn duration(ctx: &FileCtx, b: &ParsedBuilder, rel: &[Seg], v: &Scalar, diags: &mut Diagnostics) -> Option<u64> {
    match parse_duration(v.as_str()) {
        Ok(0) => {
            diags.push(ctx.diag(
                "bad-duration",
                b.pos(ctx, rel),
                "a timeout of 0 would stop every step at once".into(),
                Some("use e.g. `10m`".into()),
            ));
            None
        }
        Ok(s) => Some(s),
        Err(msg) => {
            diags.push(ctx.diag(
                "bad-duration",
                b.pos(ctx, rel),
                format!("{msg} in builder `{}`", b.name),
                Some("write seconds (`90`) or a duration such as `90s`, `10m`, `1h30m`".into()),
            ));
            None
        }
    }
}

fn lower_triggers(ctx: &FileCtx, b: &ParsedBuilder, diags: &mut Diagnostics) -> PlanTriggers {
    let Some(t) = &b.spec.triggers else {
        return PlanTriggers { push: Some(PlanBranchFilter::default()), force: true, ..Default::default() };
    };
    let on = |rest: &[Seg]| {
        let mut p = vec![key("on")];
        p.extend_from_slice(rest);
        p
    };
    let filter = |f: &Option<BranchFilter>, name: &str, diags: &mut Diagnostics| {
        f.as_ref().map(|f| {
            check_globs(ctx, b, &on(&[key(name), key("branches")]), &f.branches, diags);
            check_globs(ctx, b, &on(&[key(name), key("branches_ignore")]), &f.branches_ignore, diags);
            PlanBranchFilter { branches: f.branches.clone(), branches_ignore: f.branches_ignore.clone() }
        })
    };
    let push = filter(&t.push, "push", diags);
    let pull_request = filter(&t.pull_request, "pull_request", diags);
    check_globs(ctx, b, &on(&[key("paths")]), &t.paths, diags);
    check_globs(ctx, b, &on(&[key("paths_ignore")]), &t.paths_ignore, diags);
    let mut schedule = Vec::new();
    for (i, s) in t.schedule.iter().enumerate() {
        let p = on(&[key("schedule"), Seg::Index(i), key("cron")]);
        match Cron::parse(&s.cron) {
            Ok(_) => schedule.push(PlanSchedule {
                cron: s.cron.trim().to_owned(),
                branch: s.branch.clone().unwrap_or_else(|| ctx.src.branch.clone()),
                only_if_changed: s.only_if_changed.unwrap_or(true),
            }),
            Err(e) => {
                let mut pos = b.pos(ctx, &p);
                if let Some(field) = e.field {
                    // Point at the offending field inside the string.
                    let offset: usize = s.cron.split_whitespace().take(field).map(|f| f.len() + 1).sum::<usize>()
                        + (s.cron.len() - s.cron.trim_start().len());
                    let line = ctx.src.text.lines().nth(pos.line.saturating_sub(1) as usize).unwrap_or("");
                    let quoted =
                        line.chars().nth(pos.col.saturating_sub(1) as usize).is_some_and(|c| c == '"' || c == '\'');
                    pos.col += offset as u32 + u32::from(quoted);
                }
                diags.push(ctx.diag(
                    "bad-cron",
                    pos,
                    format!("invalid cron schedule in builder `{}`: {}", b.name, e.message),
                    Some("five fields: minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\" (03:00 UTC daily)".into()),
                ));
            }
        }
    }
    if push.is_none() && pull_request.is_none() && schedule.is_empty() && t.force == Some(false) {
        diags.push(ctx.warn(
            "never-runs",
            b.pos(ctx, &[key("on")]),
            format!("builder `{}` has no trigger left: it can never run", b.name),
            Some("add `push:`, `pull_request:`, `schedule:` or allow `force`".into()),
        ));
    }
    PlanTriggers {
        push,
        pull_request,
        paths: t.paths.clone(),
        paths_ignore: t.paths_ignore.clone(),
        schedule,
        force: t.force.unwrap_or(true),
    }
}

fn check_globs(ctx: &FileCtx, b: &ParsedBuilder, rel: &[Seg], globs: &[String], diags: &mut Diagnostics) {
    for (i, g) in globs.iter().enumerate() {
        if let Err(e) = globset::Glob::new(g) {
            let mut p = rel.to_vec();
            p.push(Seg::Index(i));
            diags.push(ctx.diag(
                "bad-glob",
                b.pos(ctx, &p),
                format!("invalid glob `{g}` in builder `{}`: {}", b.name, e.kind()),
                Some("globs use `*`, `**`, `?`, `[abc]` and `{a,b}`".into()),
            ));
        }
    }
}

/// Every combination of the matrix, after `exclude` and `include`.
fn expand_matrix(
    ctx: &FileCtx,
    b: &ParsedBuilder,
    m: &Matrix,
    eval: &dyn Evaluator,
    opts: &Options,
    diags: &mut Diagnostics,
) -> Option<Vec<IndexMap<String, String>>> {
    let mpos = b.pos(ctx, &[key("matrix")]);
    let what = format!("builder `{}`", b.name);
    let mut axes: IndexMap<String, Vec<String>> =
        m.axes.iter().map(|(k, v)| (k.clone(), v.iter().map(|s| s.0.clone()).collect())).collect();
    let mut listed: Option<Vec<IndexMap<String, String>>> = None;
    if let Some(code) = &m.python {
        if !axes.is_empty() {
            diags.push(ctx.diag(
                "matrix-mixed",
                mpos,
                format!("the matrix of {what} has both `python` and axes"),
                Some("return every axis from the snippet, or drop `python`".into()),
            ));
            return None;
        }
        let snippet_ctx = serde_json::json!({
            "repo": ctx.src.repo,
            "branch": ctx.src.branch,
            "files": ctx.src.files,
            "builder": b.name,
        });
        let mut code_path = b.base.clone();
        code_path.extend([key("matrix"), key("python")]);
        let value = run_snippet(ctx, &code_path, eval, code, &snippet_ctx, &format!("`matrix:` of {what}"), diags)?;
        let spos = ctx.spans.value(&code_path);
        let bad = |diags: &mut Diagnostics, msg: String| {
            diags.push(ctx.diag(
                "snippet-result",
                spos,
                msg,
                Some("return a list of dicts like [{\"os\": \"linux\"}], or a dict of lists like {\"os\": [\"linux\", \"mac\"]}".into()),
            ));
        };
        match value {
            serde_json::Value::Array(items) => {
                let mut combos = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let serde_json::Value::Object(obj) = item else {
                        bad(
                            diags,
                            format!(
                                "the snippet of `matrix:` of {what} returned {} at [{i}], not a dict",
                                json_kind(item)
                            ),
                        );
                        return None;
                    };
                    let mut combo = IndexMap::new();
                    for (k, v) in obj {
                        match json_scalar(v) {
                            Some(s) => {
                                combo.insert(k.clone(), s);
                            }
                            None => {
                                bad(
                                    diags,
                                    format!(
                                        "the snippet of `matrix:` of {what} returned {} for `{k}` at [{i}]; values must be text, numbers or booleans",
                                        json_kind(v)
                                    ),
                                );
                                return None;
                            }
                        }
                    }
                    combos.push(combo);
                }
                listed = Some(combos);
            }
            serde_json::Value::Object(obj) => {
                for (k, v) in obj {
                    let serde_json::Value::Array(vals) = v else {
                        bad(
                            diags,
                            format!(
                                "the snippet of `matrix:` of {what} returned {} for axis `{k}`, not a list",
                                json_kind(&v)
                            ),
                        );
                        return None;
                    };
                    let mut out = Vec::new();
                    for v in &vals {
                        match json_scalar(v) {
                            Some(s) => out.push(s),
                            None => {
                                bad(
                                    diags,
                                    format!(
                                        "the snippet of `matrix:` of {what} returned {} in axis `{k}`",
                                        json_kind(v)
                                    ),
                                );
                                return None;
                            }
                        }
                    }
                    axes.insert(k, out);
                }
            }
            other => {
                bad(diags, format!("the snippet of `matrix:` of {what} returned {}", json_kind(&other)));
                return None;
            }
        }
    }

    for (axis, values) in &axes {
        let apos = b.pos(ctx, &[key("matrix"), key(axis)]);
        if !valid_name(axis) || axis.contains('.') {
            diags.push(ctx.diag(
                "bad-name",
                apos,
                format!("invalid matrix axis name `{axis}` in {what}"),
                Some("use letters, digits, `_` and `-`".into()),
            ));
            return None;
        }
        if values.is_empty() {
            diags.push(ctx.diag("empty-axis", apos, format!("matrix axis `{axis}` of {what} has no values"), None));
            return None;
        }
        for v in values {
            if v.contains([',', ']', '[', '=']) {
                diags.push(ctx.diag(
                    "bad-matrix-value",
                    apos,
                    format!("matrix value `{v}` of {what} contains one of `,` `=` `[` `]`"),
                    Some("these characters separate values in builder ids".into()),
                ));
                return None;
            }
        }
    }

    let mut combos: Vec<IndexMap<String, String>> = match listed {
        Some(list) => list,
        None => {
            let total = axes.values().fold(1usize, |acc, v| acc.saturating_mul(v.len()));
            if total > opts.max_matrix {
                let sizes: Vec<String> = axes.iter().map(|(k, v)| format!("{k}: {}", v.len())).collect();
                diags.push(
                    ctx.diag(
                        "matrix-too-large",
                        mpos,
                        format!(
                            "the matrix of {what} expands to {total} combinations ({}), more than the limit of {}",
                            sizes.join(" × "),
                            opts.max_matrix
                        ),
                        Some(
                            "split the builder, trim an axis, or list only the combinations you need under `include:`"
                                .into(),
                        ),
                    ),
                );
                return None;
            }
            let mut out = vec![IndexMap::new()];
            for (axis, values) in &axes {
                let mut next = Vec::with_capacity(out.len() * values.len());
                for combo in &out {
                    for v in values {
                        let mut c: IndexMap<String, String> = combo.clone();
                        c.insert(axis.clone(), v.clone());
                        next.push(c);
                    }
                }
                out = next;
            }
            if axes.is_empty() {
                out.clear();
            }
            out
        }
    };

    let axis_names: Vec<&str> = axes.keys().map(String::as_str).collect();
    for (i, ex) in m.exclude.iter().enumerate() {
        for k in ex.keys() {
            if !axes.contains_key(k) {
                diags.push(
                    ctx.diag(
                        "unknown-axis",
                        b.pos(ctx, &[key("matrix"), key("exclude"), Seg::Index(i), key(k)]),
                        format!("`exclude` names axis `{k}`, which the matrix of {what} does not have"),
                        did_you_mean(k, axis_names.iter().copied())
                            .or_else(|| Some(format!("axes: {}", name_list(&axis_names, 10)))),
                    ),
                );
                return None;
            }
        }
        combos.retain(|c| !ex.iter().all(|(k, v)| c.get(k).map(String::as_str) == Some(v.as_str())));
    }
    for inc in &m.include {
        let c: IndexMap<String, String> = inc.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        if !combos.contains(&c) {
            combos.push(c);
        }
    }
    if combos.len() > opts.max_matrix {
        diags.push(ctx.diag(
            "matrix-too-large",
            mpos,
            format!(
                "the matrix of {what} has {} combinations, more than the limit of {}",
                combos.len(),
                opts.max_matrix
            ),
            Some("split the builder or trim the list".into()),
        ));
        return None;
    }
    if combos.is_empty() {
        diags.push(ctx.diag(
            "empty-matrix",
            mpos,
            format!("the matrix of {what} has no combinations left"),
            Some("`exclude` removed every combination, or no axis has values".into()),
        ));
        return None;
    }
    Some(combos)
}

fn json_scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Why `repo` may not use the secret `name` (`None` when it may, or when the declared
/// secrets are not known to this compile).
fn secret_refused(opts: &Options, repo: &str, name: &str) -> Option<String> {
    let declared = opts.secrets.as_ref()?;
    match declared.get(name) {
        None => Some(format!("secret `{name}`, which the master config does not declare")),
        Some(repos) if !repos.is_empty() && !repos.iter().any(|r| r == repo) => {
            Some(format!("secret `{name}`, which repository `{repo}` may not use (only {})", repos.join(", ")))
        }
        Some(_) => None,
    }
}

/// The declared secrets `repo` may use, sorted.
fn usable_secrets(opts: &Options, repo: &str) -> Vec<String> {
    opts.secrets
        .iter()
        .flatten()
        .filter(|(_, repos)| repos.is_empty() || repos.iter().any(|r| r == repo))
        .map(|(name, _)| name.clone())
        .collect()
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names.dedup();
    names
}

/// The `${{ secrets.* }}` expressions in `s`, as written inside the braces.
fn secret_refs(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else { break };
        let expr = after[..end].trim();
        if expr == "secrets" || expr.starts_with("secrets.") || expr.starts_with("secrets[") {
            out.push(expr);
        }
        rest = &after[end + 2..];
    }
    out
}

/// A secret is usable only in `env` values (the builder's or a step's): anywhere else (the
/// command, names, image, inputs, conditions, matrix values...) it would end up in the plan,
/// a log line or a cache key in clear. Each other place that names one is an error.
fn check_secret_places(ctx: &FileCtx, b: &ParsedBuilder, diags: &mut Diagnostics) {
    let Ok(doc) = serde_json::to_value(&b.spec) else { return };
    let mut places = Vec::new();
    walk_strings(&doc, &mut Vec::new(), &mut places);
    for (path, expr) in places {
        let in_env = matches!(path.as_slice(), [Seg::Key(k), _] if k == "env")
            || matches!(path.as_slice(), [Seg::Key(s), Seg::Index(_), Seg::Key(k), _] if s == "steps" && k == "env");
        if in_env {
            continue;
        }
        let place = path
            .iter()
            .map(|s| match s {
                Seg::Key(k) => k.clone(),
                Seg::Index(i) => format!("[{i}]"),
            })
            .collect::<Vec<_>>()
            .join(".")
            .replace(".[", "[");
        diags.push(ctx.diag(
            "secret-outside-env",
            b.pos(ctx, &path),
            format!("`${{{{ {expr} }}}}` in `{place}` of builder `{}`", b.name),
            Some(
                "secrets may only be used in env: values (the builder's or a step's), e.g. `env: { TOKEN: \"${{ secrets.NAME }}\" }`, then `$TOKEN` in `run:`".into(),
            ),
        ));
    }
}

fn walk_strings(v: &serde_json::Value, path: &mut Vec<Seg>, out: &mut Vec<(Vec<Seg>, String)>) {
    match v {
        serde_json::Value::String(s) => {
            for expr in secret_refs(s) {
                out.push((path.clone(), expr.to_owned()));
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                walk_strings(item, path, out);
                path.pop();
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map {
                path.push(key(k));
                walk_strings(item, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Replaces `${{ matrix.<axis> }}` in `s`. With `secrets` (an env value), a
/// `${{ secrets.NAME }}` stays, written `${{ secrets.NAME }}`, and NAME is collected.
fn substitute(
    s: &str,
    combo: &IndexMap<String, String>,
    mut secrets: Option<&mut Vec<String>>,
) -> Result<String, String> {
    if !s.contains("${{") {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let Some(end) = after.find("}}") else {
            return Err("`${{` is not closed with `}}`".into());
        };
        let expr = after[..end].trim();
        if let (Some(name), Some(found)) = (expr.strip_prefix("secrets."), secrets.as_deref_mut()) {
            if !crate::parse::valid_env_name(name) {
                return Err(format!("`${{{{ {expr} }}}}` does not name a secret (names are letters, digits and `_`)"));
            }
            out.push_str(&format!("${{{{ secrets.{name} }}}}"));
            found.push(name.to_owned());
            rest = &after[end + 2..];
            continue;
        }
        match expr.strip_prefix("matrix.") {
            Some(axis) => match combo.get(axis) {
                Some(v) => out.push_str(v),
                None => return Err(format!("`${{{{ {expr} }}}}` names no matrix axis")),
            },
            None => {
                return Err(format!(
                    "unknown expression `${{{{ {expr} }}}}` (only `matrix.<axis>`, and `secrets.<NAME>` in env values, exist)"
                ));
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_matrix_values() {
        let mut c = IndexMap::new();
        c.insert("os".to_owned(), "linux".to_owned());
        assert_eq!(substitute("build-${{ matrix.os }}-${{matrix.os}}", &c, None).as_deref(), Ok("build-linux-linux"));
        assert!(substitute("${{ matrix.py }}", &c, None).is_err());
        assert!(substitute("${{ secrets.x }}", &c, None).is_err());
        assert!(substitute("${{ matrix.os", &c, None).is_err());
    }

    #[test]
    fn env_values_keep_secrets_and_name_them() {
        let mut c = IndexMap::new();
        c.insert("os".to_owned(), "linux".to_owned());
        let mut found = Vec::new();
        let got = substitute("Bearer ${{secrets.TOKEN}} on ${{ matrix.os }}", &c, Some(&mut found));
        assert_eq!(got.as_deref(), Ok("Bearer ${{ secrets.TOKEN }} on linux"));
        assert_eq!(found, vec!["TOKEN".to_owned()]);
        assert!(substitute("${{ secrets.a-b }}", &c, Some(&mut Vec::new())).is_err());
        assert_eq!(secret_refs("x ${{ secrets.A }} ${{ matrix.os }} ${{secrets.B}}"), vec!["secrets.A", "secrets.B"]);
    }
}
