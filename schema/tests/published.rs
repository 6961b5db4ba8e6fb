//! The JSON Schema files under schema/ are generated from the Rust types; this fails when
//! they are stale. `cargo xtask codegen` rewrites them.

use std::path::Path;

fn check(file: &str, generated: String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(committed == generated, "{} is stale: run `cargo xtask codegen` and commit the result", path.display());
}

#[test]
fn pipeline_schema_is_current() {
    check("pipeline.schema.json", rbb_schema::pipeline_json_schema());
}

#[test]
fn config_schema_is_current() {
    check("config.schema.json", rbb_schema::config_json_schema());
}

#[test]
fn schema_describes_every_builder_key() {
    let schema: serde_json::Value = serde_json::from_str(&rbb_schema::pipeline_json_schema()).expect("valid JSON");
    let builder = &schema["$defs"]["Builder"]["properties"];
    for key in ["extends", "on", "needs", "labels", "image", "matrix", "steps", "env", "timeout"] {
        assert!(builder.get(key).is_some(), "Builder schema lacks `{key}`");
        assert!(builder[key].get("description").is_some(), "Builder key `{key}` has no description for editors");
    }
}
