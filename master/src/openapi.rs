//! The OpenAPI 3.1 document of the REST API (`GET /api/v2/openapi.json`), made from the
//! endpoint table in [`crate::http`] and the JSON Schemas of the `rbb_schema::api` types, so
//! it always matches the routes.

use crate::http::Endpoint;
use serde_json::{Map, Value, json};

fn components() -> Value {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<rbb_schema::api::Build>();
    generator.subschema_for::<rbb_schema::api::Builder>();
    generator.subschema_for::<rbb_schema::api::Step>();
    generator.subschema_for::<rbb_schema::api::Worker>();
    generator.subschema_for::<rbb_schema::api::Change>();
    generator.subschema_for::<rbb_schema::api::BuildRequest>();
    generator.subschema_for::<rbb_schema::api::ForceRequest>();
    generator.subschema_for::<rbb_schema::api::Forced>();
    generator.subschema_for::<rbb_schema::api::ErrorBody>();
    generator.subschema_for::<rbb_schema::api::Meta>();
    generator.subschema_for::<rbb_schema::plan::Plan>();
    Value::Object(generator.take_definitions(true).into_iter().collect())
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

pub fn document(endpoints: &[Endpoint]) -> Value {
    let mut paths = Map::new();
    for e in endpoints {
        let mut params = Vec::new();
        for seg in e.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                params.push(json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }));
            }
        }
        let mut responses = Map::new();
        if let Some(item) = e.list_of {
            for (name, desc) in [
                ("limit", "At most this many items (default 100, at most 1000)"),
                ("offset", "Skip this many items"),
                ("order", "Comma-separated fields, `-field` for descending"),
            ] {
                params.push(json!({ "name": name, "in": "query", "required": false, "description": desc, "schema": { "type": "string" } }));
            }
            params.push(json!({
                "name": "filters", "in": "query", "required": false, "style": "form", "explode": true,
                "description": "`field=value` or `field__op=value` with op eq, ne, lt, le, gt, ge, contains",
                "schema": { "type": "object", "additionalProperties": { "type": "string" } }
            }));
            let list_name = e.path.rsplit('/').next().unwrap_or("items");
            responses.insert("200".into(), json!({
                "description": "A page of the list",
                "content": { "application/json": { "schema": {
                    "type": "object",
                    "properties": { list_name: { "type": "array", "items": schema_ref(item) }, "meta": schema_ref("Meta") }
                } } }
            }));
        } else if let Some(s) = e.answers {
            let code = if e.method == "post" { "201" } else { "200" };
            responses.insert(
                code.into(),
                json!({ "description": "OK", "content": { "application/json": { "schema": schema_ref(s) } } }),
            );
        } else {
            responses.insert("200".into(), json!({ "description": "OK" }));
        }
        responses.insert("4XX".into(), json!({ "description": "A client error", "content": { "application/json": { "schema": schema_ref("ErrorBody") } } }));
        let mut op = json!({
            "summary": e.summary,
            "operationId": format!("{}{}", e.method, e.path.replace(['/', '{', '}', '.'], "_")),
            "parameters": params,
            "responses": responses,
        });
        if let Some(b) = e.body {
            op["requestBody"] =
                json!({ "required": false, "content": { "application/json": { "schema": schema_ref(b) } } });
        }
        if e.control {
            op["security"] = json!([{ "bearer": [] }]);
        }
        let entry = paths.entry(e.path.to_owned()).or_insert_with(|| json!({}));
        entry[e.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rbb REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Buildbot-style data API: lists take `field=`, `field__op=`, `order=-field`, `limit`, `offset` and answer `meta.total`. Errors share one shape. Control actions need `Authorization: Bearer <api_token>` when the master config sets one."
        },
        "paths": paths,
        "components": {
            "schemas": components(),
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        }
    })
}
