//! rbb's file and wire formats, and nothing else.
//!
//! - [`pipeline`]: what a repository commits as `.rbb/pipeline.yaml`. The JSON Schema for it
//!   is generated from these types and committed as `schema/pipeline.schema.json`.
//! - [`config`]: the master config (`rbb.yaml`): repositories to watch, workers, state.
//! - [`plan`]: the compiled plan, the stable JSON that `rbb compile --format json` prints and
//!   that builds pin.
//!
//! This crate is a leaf: it depends on no other rbb crate and holds no logic beyond
//! (de)serialisation and small accessors. Validation lives in the compiler.

pub mod config;
pub mod pipeline;
pub mod plan;

/// The JSON Schema of `.rbb/pipeline.yaml`, as pretty-printed JSON with a trailing newline.
///
/// `schema/pipeline.schema.json` must equal this; `cargo xtask codegen` rewrites it.
pub fn pipeline_json_schema() -> String {
    let schema = schemars::schema_for!(pipeline::Pipeline);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// The JSON Schema of the master config (`rbb.yaml`).
pub fn config_json_schema() -> String {
    let schema = schemars::schema_for!(config::MasterConfig);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
