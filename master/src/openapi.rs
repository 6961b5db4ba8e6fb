//! The OpenAPI 3.1 document of the REST API (`GET /api/v2/openapi.json`), made from the
//! endpoint table in [`crate::http`] and the JSON Schemas of the `rbb_schema::api` types, so
//! it always matches the routes. It declares every status the server answers with.

use crate::http::Endpoint;
use crate::query::{Field, Kind};
use serde_json::{Map, Value, json};

/// JSON Schema 2020-12 (what OpenAPI 3.1 speaks: `type: [x, "null"]`, no `nullable`).
fn components() -> Map<String, Value> {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
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
    generator.subschema_for::<rbb_schema::api::CacheStats>();
    generator.subschema_for::<rbb_schema::api::CacheGc>();
    generator.subschema_for::<rbb_schema::api::CacheReset>();
    generator.subschema_for::<crate::forge::outbox_store::StatusList>();
    generator.subschema_for::<rbb_schema::api::WhoAmI>();
    generator.subschema_for::<rbb_schema::api::AuditList>();
    let mut defs: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    defs.insert(
        "Rebuilt".into(),
        json!({ "type": "object", "required": ["build"], "properties": { "build": { "type": "integer", "minimum": 0 } } }),
    );
    defs.insert(
        "LogMeta".into(),
        json!({
            "type": "object",
            "required": ["id", "build", "step", "bytes", "complete"],
            "properties": {
                "id": { "type": "integer", "minimum": 0 },
                "build": { "type": "integer", "minimum": 0 },
                "step": { "type": "integer", "minimum": 0 },
                "bytes": { "type": "integer", "minimum": 0 },
                "complete": { "type": "boolean", "description": "false while the step still writes to it" },
                "expired": { "type": "boolean", "description": "removed by the retention policy" }
            }
        }),
    );
    defs.insert(
        "LogStreams".into(),
        json!({
            "type": "object",
            "required": ["id", "bytes", "runs"],
            "properties": {
                "id": { "type": "integer", "minimum": 0 },
                "bytes": { "type": "integer", "minimum": 0, "description": "the log's size now" },
                "runs": {
                    "type": "array",
                    "description": "runs overlapping the range asked, in order; each lasts until the next (the last, until the end of the log); the first may start before `offset`",
                    "items": {
                        "type": "object",
                        "required": ["offset", "stream"],
                        "properties": {
                            "offset": { "type": "integer", "minimum": 0 },
                            "stream": { "enum": ["stdout", "stderr", "header"] }
                        }
                    }
                }
            }
        }),
    );
    defs.insert(
        "BuilderPage".into(),
        json!({
            "type": "object",
            "required": ["builder", "builds"],
            "properties": {
                "builder": schema_ref("Builder"),
                "builds": { "type": "array", "items": schema_ref("Build") }
            }
        }),
    );
    defs.insert(
        "Grid".into(),
        json!({
            "type": "object",
            "description": "`columns`: commits, newest first, with subject, author and time when known; `builders`: rows; `cells`: builder id → commit → the newest build of that builder for that commit.",
            "properties": {
                "columns": { "type": "array", "items": { "type": "object" } },
                "builders": { "type": "array", "items": { "type": "object" } },
                "cells": { "type": "object", "additionalProperties": { "type": "object" } }
            }
        }),
    );
    defs
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema_ref("ErrorBody") } } })
}

/// The query parameter of a filter on `field` (equality; `field__op` works the same way).
fn filter_param(f: &Field) -> Value {
    let schema = match &f.kind {
        Kind::Number => json!({ "type": "number" }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::Word(words) => {
            let mut words = words.clone();
            if f.nullable {
                words.push("null".into());
            }
            json!({ "type": "string", "enum": words })
        }
        Kind::Text => json!({ "type": "string" }),
    };
    json!({
        "name": f.name, "in": "query", "required": false, "schema": schema,
        "description": format!("Only items whose `{0}` equals this. `{0}__ne`, `__lt`, `__le`, `__gt`, `__ge`, `__contains` compare otherwise.", f.name)
    })
}

fn path_param(name: &str) -> Value {
    let schema = match name {
        "id" => json!({ "type": "integer", "minimum": 0, "maximum": crate::query::MAX_OFFSET }),
        "forge" => json!({ "type": "string", "enum": ["github", "gitlab", "gitea", "forgejo"] }),
        _ => json!({ "type": "string" }),
    };
    json!({ "name": name, "in": "path", "required": true, "schema": schema })
}

/// The type of an endpoint's own query parameter (`Endpoint::query`), as its handler checks it.
fn query_schema(name: &str) -> Value {
    match name {
        "delivery" => json!({ "type": "string", "enum": ["queued", "sent", "retrying", "given_up", "superseded"] }),
        "state" => {
            json!({ "type": "string", "enum": ["pending", "running", "success", "failure", "error", "cancelled"] })
        }
        "limit" => json!({ "type": "integer", "minimum": 0, "maximum": 500 }),
        "before" => json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX }),
        "offset" => json!({ "type": "integer", "minimum": 0, "maximum": crate::forge::outbox_store::MAX_SCAN }),
        _ => json!({ "type": "string" }),
    }
}

fn int_param(name: &str, description: &str, max: u64) -> Value {
    let schema = json!({ "type": "integer", "minimum": 0, "maximum": max });
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

/// What an error status means, for the document.
fn error_meaning(code: u16) -> &'static str {
    match code {
        400 => "A malformed id, body, filter or query string",
        401 => "No token where the endpoint's role needs one, or a wrong token (`Authorization: Bearer <token>`)",
        403 => "The token's role is below the endpoint's (or a webhook whose signature does not verify)",
        429 => "Too many requests: wait `Retry-After` seconds",
        404 => "No such item",
        409 => "The item is not in a state this action applies to",
        413 => "The request body is too large",
        416 => "The range asks for no existing byte (`Content-Range: bytes */<size>`)",
        _ => "An error",
    }
}

pub fn document(endpoints: &[Endpoint]) -> Value {
    let schemas = components();
    let mut paths = Map::new();
    for e in endpoints {
        let mut params: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(path_param)
            .collect();
        for (name, description) in e.query {
            params.push(json!({ "name": name, "in": "query", "required": false,
                "schema": query_schema(name), "description": description }));
        }
        let mut responses = Map::new();
        if let Some(item) = e.list_of {
            params.push(int_param("limit", "At most this many items (default 100)", crate::query::MAX_LIMIT as u64));
            params.push(int_param("offset", "Skip this many items", crate::query::MAX_OFFSET));
            let props = schemas.get(item).and_then(|s| s.get("properties")).and_then(Value::as_object);
            let names: Vec<&str> = props.into_iter().flatten().map(|(k, _)| k.as_str()).collect();
            let one = format!("-?({})", names.join("|"));
            params.push(json!({ "name": "order", "in": "query", "required": false,
                "schema": { "type": "string", "pattern": format!("^({one}(,{one})*)?$") },
                "description": "Comma-separated fields, `-field` for descending" }));
            for (name, schema) in props.into_iter().flatten() {
                params.push(filter_param(&Field::from_schema(name, schema, &schemas)));
            }
            let list_name = e.path.rsplit('/').next().unwrap_or("items");
            responses.insert("200".into(), json!({
                "description": "A page of the list",
                "content": { "application/json": { "schema": {
                    "type": "object",
                    "required": [list_name, "meta"],
                    "properties": { list_name: { "type": "array", "items": schema_ref(item) }, "meta": schema_ref("Meta") }
                } } }
            }));
        }
        for (code, content) in &e.answers {
            let body = match content {
                crate::http::Answer::Json(s) => json!({ "application/json": { "schema": schema_ref(s) } }),
                crate::http::Answer::AnyJson => json!({ "application/json": { "schema": { "type": "object" } } }),
                crate::http::Answer::Text => json!({ "text/plain": { "schema": { "type": "string" } } }),
                crate::http::Answer::EventStream => json!({ "text/event-stream": { "schema": { "type": "string" } } }),
                crate::http::Answer::Empty => Value::Null,
            };
            let mut r = json!({ "description": match code { 201 => "Created", 202 => "Accepted", 206 => "Part of the log", _ => "OK" } });
            if !body.is_null() {
                r["content"] = body;
            }
            if e.path.ends_with("/raw") {
                r["headers"] = json!({
                    "x-rbb-log-size": { "description": "The log's size now", "schema": { "type": "integer", "minimum": 0 } },
                    "Accept-Ranges": { "schema": { "type": "string", "const": "bytes" } }
                });
                if *code == 206 {
                    r["headers"]["Content-Range"] = json!({ "required": true, "schema": { "type": "string" } });
                }
            }
            responses.insert(code.to_string(), r);
        }
        let mut errors: Vec<u16> = e.errors.to_vec();
        if e.list_of.is_some() {
            errors.push(400);
        }
        let access = e.access.unwrap_or(rbb_schema::config::Access::Admin);
        if access > rbb_schema::config::Access::None {
            errors.extend([401, 403]);
        }
        if access >= rbb_schema::config::Access::Control || e.is_webhook() {
            errors.push(429);
        }
        if e.body.is_some() {
            errors.push(413);
        }
        errors.sort_unstable();
        errors.dedup();
        for code in errors {
            let mut r = error_response(error_meaning(code));
            if code == 429 {
                r["headers"] = json!({ "Retry-After": { "required": true, "description": "Seconds to wait", "schema": { "type": "integer", "minimum": 1 } } });
            }
            responses.insert(code.to_string(), r);
        }
        if e.path.ends_with("/raw") {
            params.push(json!({ "name": "Range", "in": "header", "required": false, "schema": { "type": "string" },
                "description": "`bytes=a-b`, `bytes=a-` or `bytes=-n` (RFC 9110); several ranges or an invalid one answer the whole log" }));
            params.push(int_param("offset", "Start at this byte (instead of a Range)", crate::query::MAX_OFFSET));
            params.push(int_param("limit", "At most this many bytes", crate::query::MAX_OFFSET));
            responses.insert(
                "416".into(),
                json!({ "description": error_meaning(416), "headers": { "Content-Range": { "required": true, "schema": { "type": "string" } } },
                    "content": { "application/json": { "schema": schema_ref("ErrorBody") } } }),
            );
        }
        if e.path.ends_with("/grid") {
            params.push(int_param("limit", "At most this many commits (columns), default 50", 500));
        }
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
        // The role an endpoint needs; without a token a caller has the master's anonymous role.
        op["x-rbb-role"] = json!(access.name());
        // Reading may be open to anonymous callers (the master's `anonymous: read`): a token is
        // optional there (`{}`), required for control and admin actions.
        op["security"] = match access {
            rbb_schema::config::Access::None => json!([]),
            rbb_schema::config::Access::Read => json!([{ "bearer": [] }, {}]),
            _ => json!([{ "bearer": [] }]),
        };
        let entry = paths.entry(e.path.to_owned()).or_insert_with(|| json!({}));
        entry[e.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rbb REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Buildbot-style data API: lists take `field=`, `field__op=`, `order=-field`, `limit`, `offset` and answer `meta.total`. Errors share one shape. Each operation needs a role (`x-rbb-role`: none, read, control or admin; admin ⊃ control ⊃ read): send `Authorization: Bearer <token>`; without one a caller has the master's anonymous role (docs/security.md)."
        },
        "servers": [{ "url": "/", "description": "The master that serves this document" }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        }
    })
}
