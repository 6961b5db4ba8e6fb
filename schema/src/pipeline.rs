//! The `.rbb/pipeline.yaml` format: what one repository declares.
//!
//! These types are the published shape of the file (the JSON Schema is generated from them).
//! They only describe and deserialise; every check that needs more than a type (names, globs,
//! cron strings, durations, `needs` across repositories) is the compiler's job.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// What a builder, template or matrix axis may be called: a letter or digit first, then
/// letters, digits, `.`, `_` and `-`, at most 100 characters (no spaces, no `/`).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$";

/// A repository's pipeline: builders, the templates they extend, and an optional snippet that
/// generates more builders.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "rbb pipeline (.rbb/pipeline.yaml)")]
pub struct Pipeline {
    /// Format version of this file. Only `1` exists; omit it to mean `1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1))]
    pub version: Option<u32>,
    /// Reusable builder fragments. A builder takes one or more of them with `extends:`; its own
    /// keys win, mappings are merged key by key, lists and scalars are replaced.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN }))]
    pub templates: IndexMap<String, Builder>,
    /// The builders of this repository, by name. Names are unique within the repository; other
    /// repositories refer to them as `<repo>/<name>`.
    /// A builder has steps of its own (at least one) or takes them from templates.
    #[serde(default)]
    #[schemars(extend(
        "propertyNames" = { "pattern": NAME_PATTERN },
        "additionalProperties" = {
            "$ref": "#/$defs/Builder",
            "anyOf": [
                { "required": ["steps"], "properties": { "steps": { "minItems": 1 } } },
                { "required": ["extends"] }
            ]
        }
    ))]
    pub builders: IndexMap<String, Builder>,
    /// A Python snippet that returns a mapping of builder name to builder definition, merged
    /// into `builders`. It sees `ctx` with `repo`, `branch`, `files` and `pipeline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<PythonSnippet>,
}

/// A Python snippet: the body of a function of `ctx` that must `return` plain data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PythonSnippet {
    /// Python source. Runs sandboxed: no files, network, processes or clock; time and memory
    /// are limited. Allowed imports: json, re, math, itertools, functools, collections, string.
    pub python: String,
}

/// One builder: a sequence of steps that runs on one worker for one commit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    /// Templates (from `templates:`) this builder starts from, in order; later ones win.
    #[serde(default, skip_serializing_if = "OneOrMany::is_empty")]
    pub extends: OneOrMany,
    /// One line shown in the UI and in `rbb compile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free-form tags, used to filter the grid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// What starts this builder. Omitted: a push to any watched branch, and forced builds.
    #[serde(default, rename = "on", skip_serializing_if = "Option::is_none")]
    pub triggers: Option<Triggers>,
    /// Builders that must succeed for the same change first: `name` in this repository or
    /// `repo/name` in another. Naming a matrix builder waits for all of its combinations.
    #[serde(default, skip_serializing_if = "OneOrMany::is_empty")]
    pub needs: OneOrMany,
    /// A worker runs this builder only if it has every one of these labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Run every step in this Docker image (a step may override it). Steps that use it run in
    /// one container for the whole build, with the checkout mounted at `/workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Memory limit of the containers of its steps (a step may override it) (swap included): bytes, or with a suffix `k`, `m`,
    /// `g` (powers of 1024), e.g. `512m`. A step that goes over it is killed (exit code 137).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Scalar>,
    /// CPU limit of the containers of its steps (a step may override it), in CPUs, e.g. `1.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Scalar>,
    /// Network of the containers of its steps (a step may override it): `bridge` (the engine's default), `none` or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// User the commands run as in the containers of its steps (a step may override it): `uid[:gid]` or a user of the image.
    /// Default: the worker's own uid:gid, so files left in the checkout are the worker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Host paths mounted read-only into the containers of its steps (a step's own `mounts`
    /// replace them). A worker runs the build only if it allows every source
    /// (`rbb-worker --allow-mount PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<Mount>>,
    /// Platform the images of its steps must run on (a step may override it), e.g.
    /// `linux/arm64`: only a worker whose Docker engine runs that platform takes the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Containers started before the steps, one set per build, on a network of the build's own:
    /// a step reaches a service by its name (`nc db 5432`). Needs `image:` on the builder or its
    /// steps; they are removed when the build ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Environment for every step (a step's own `env` wins).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub env: IndexMap<String, Scalar>,
    /// Working directory of every step, relative to the checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Default timeout of every step: seconds, or a duration such as `90s`, `10m`, `1h30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Scalar>,
    /// Run this builder once per combination of values. `${{ matrix.<axis> }}` in names,
    /// commands, env, labels and image is replaced by the combination's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix: Option<Matrix>,
    /// Higher runs first when builders wait for the same worker. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Replace a waiting build of the same branch by the newer one (its changes move along).
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse: Option<bool>,
    /// Stop a running build of the same branch when a newer commit is queued. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_superseded: Option<bool>,
    /// At most this many builds of this builder run at once (all workers together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Locks (declared in the master config) a build holds while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locks: Vec<LockUse>,
    /// Part of every step's cache key: change it to make the builder's cached steps run
    /// again (see docs/cache.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<Scalar>,
    /// The steps, run in order in one checkout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
}

/// A host path mounted read-only into a step's container. The worker must allow the source
/// (`rbb-worker --allow-mount PATH`), after symlinks are resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Absolute path on the worker's host.
    pub source: String,
    /// Absolute path inside the container (not `/workspace` or below it).
    pub target: String,
}

/// A container a builder's steps talk to over the build's network (a database, a server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Its host name on the build's network: a DNS label (lowercase letters, digits and `-`,
    /// at most 63 characters). Unique within the builder.
    pub name: String,
    /// Docker image of the service.
    pub image: String,
    /// Environment of the service's container.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub env: IndexMap<String, Scalar>,
    /// Command run by `sh -c` instead of the image's own command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// How to tell the service is ready. Without it, a running container is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// A service's readiness check, run by `sh -c` inside the service's container until it
/// exits 0. The steps start only after it passes; after `retries` failures the build's step
/// ends FAILURE with the service's last output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Shell command, e.g. `nc -z localhost 5432`.
    pub command: String,
    /// Time between checks: a duration such as `1s`, `500ms`. Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Scalar>,
    /// Failed checks before the service counts as broken. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Limit of one check. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Scalar>,
}

/// A lock a build takes: `exclusive` (alone) or `counting` (up to the lock's `max` holders).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LockUse {
    pub name: String,
    #[serde(default)]
    pub mode: LockMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    #[default]
    Counting,
    Exclusive,
}

/// When a builder runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// Run on a push. `{}` or omitted `branches` means every watched branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<BranchFilter>,
    /// Run on pull (merge) requests whose target branch matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<BranchFilter>,
    /// Run only if a changed file matches one of these globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Do not run if every changed file matches one of these globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths_ignore: Vec<String>,
    /// Run on a clock: 5-field cron strings (`minute hour day-of-month month day-of-week`, UTC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<Schedule>,
    /// Whether the builder can be forced by hand. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

/// Branch globs (`main`, `release/*`, `**`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchFilter {
    /// Globs of branch names; empty means every watched branch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
    /// Globs of branch names to leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches_ignore: Vec<String>,
}

/// A cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// 5-field cron string in UTC, e.g. `0 3 * * *` (every night at 03:00).
    pub cron: String,
    /// Branch to build. Default: the repository's pipeline branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Build only if the branch moved since the last scheduled build. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_if_changed: Option<bool>,
}

/// A build matrix: axes of values (every combination runs), plus `include` and `exclude`, or a
/// `python` snippet returning the list of combinations. `python` is the snippet when it is a
/// string and an axis like any other when it is a list, so an axis may be called `python`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct Matrix {
    /// Snippet returning a list of combinations (mappings of axis to value) or a mapping of
    /// axis to list of values. A list here is the values of an axis named `python`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<PythonOrAxis>")]
    pub python: Option<String>,
    /// Extra combinations added after expansion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<IndexMap<String, Scalar>>,
    /// Partial combinations to remove: every combination that matches all given axes goes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<IndexMap<String, Scalar>>,
    /// The axes, each a list of values, in the order written.
    #[serde(flatten)]
    pub axes: IndexMap<String, Vec<Scalar>>,
}

/// What `python:` in a matrix may be (for the JSON Schema).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum PythonOrAxis {
    /// A snippet.
    Snippet(String),
    /// The values of an axis named `python`.
    Axis(Vec<Scalar>),
}

impl<'de> Deserialize<'de> for Matrix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// `python:`'s value: a snippet (a string) or an axis (a list).
        struct PythonValue(Result<String, Vec<Scalar>>);
        impl<'de> Deserialize<'de> for PythonValue {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = PythonValue;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a snippet (a string) or the values of an axis named `python` (a list)")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PythonValue, E> {
                        Ok(PythonValue(Ok(v.to_owned())))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<PythonValue, A::Error> {
                        let mut values = Vec::new();
                        while let Some(v) = seq.next_element::<Scalar>()? {
                            values.push(v);
                        }
                        Ok(PythonValue(Err(values)))
                    }
                }
                deserializer.deserialize_any(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Matrix;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of axis to values, with optional `include`, `exclude`, or a `python` snippet")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Matrix, A::Error> {
                let mut m = Matrix::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "python" => match map.next_value::<PythonValue>()?.0 {
                            Ok(code) => m.python = Some(code),
                            Err(values) => {
                                m.axes.insert(key, values);
                            }
                        },
                        "include" => m.include = map.next_value()?,
                        "exclude" => m.exclude = map.next_value()?,
                        _ => {
                            let values = map.next_value()?;
                            m.axes.insert(key, values);
                        }
                    }
                }
                Ok(m)
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// One shell command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique within the builder. Default: `step-<n>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Shell command (run by `sh -c` in the checkout).
    pub run: String,
    /// Extra environment (wins over the builder's).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub env: IndexMap<String, Scalar>,
    /// Names of worker environment variables passed through; their values are part of the
    /// cache key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pass_env: Vec<String>,
    /// Working directory relative to the checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Seconds, or a duration such as `90s`, `10m`, `1h30m`. Default: the builder's, else 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Scalar>,
    /// Stop the build after this step fails. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_on_failure: Option<bool>,
    /// A failure of this step makes the build FAILURE. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flunk_on_failure: Option<bool>,
    /// A failure of this step makes the build WARNINGS (if nothing worse). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_on_failure: Option<bool>,
    /// Run even after an earlier step halted the build. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always_run: Option<bool>,
    /// Run only if this condition holds, e.g. `branch == 'main' && event != 'pull_request'`.
    /// Names: branch, event, repo, builder, matrix.<axis>, props.<name>; functions
    /// startsWith, endsWith, contains, success(), failure(); operators == != && || ! ( ).
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Run this step in a Docker image (wins over the builder's), in a fresh container of its
    /// own, with the checkout mounted at `/workspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Memory limit of the container (wins over the builder's) (swap included): bytes, or with a suffix `k`, `m`,
    /// `g` (powers of 1024), e.g. `512m`. A step that goes over it is killed (exit code 137).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Scalar>,
    /// CPU limit of the container (wins over the builder's), in CPUs, e.g. `1.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Scalar>,
    /// Network of the container (wins over the builder's): `bridge` (the engine's default), `none` or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// User the commands run as in the container (wins over the builder's): `uid[:gid]` or a user of the image.
    /// Default: the worker's own uid:gid, so files left in the checkout are the worker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Host paths mounted read-only into the container (replace the builder's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<Mount>>,
    /// Platform the step's image must run on (wins over the builder's), e.g. `linux/arm64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Paths (files or directories of the repository) whose content decides the step's
    /// result. With `inputs`, an unchanged step can be reused from the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Paths the step produces, stored in the cache and restored on reuse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// `false`: never reuse this step from the cache (nor any later step of the builder).
    /// Default true (a step is reused only when it declares `inputs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
}

/// A YAML scalar taken as text: a string, a number or a boolean (`1`, `true`, `3.10`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Scalar(pub String);

impl Scalar {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for Scalar {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Scalar".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A string, number or boolean, taken as text.",
            "type": ["string", "number", "boolean"]
        })
    }
}

/// A string, or a list of strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct OneOrMany(pub Vec<String>);

impl OneOrMany {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a name or a list of names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    out.push(item);
                }
                Ok(OneOrMany(out))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for OneOrMany {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OneOrMany".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A name, or a list of names.",
            "anyOf": [
                { "type": "string" },
                { "type": "array", "items": { "type": "string" } }
            ]
        })
    }
}
