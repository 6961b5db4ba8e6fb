//! The REST API (`/api/v2`), over the [`Engine`]'s queries and actions. Errors share one JSON
//! shape ([`rbb_schema::api::ErrorBody`]); server errors reveal nothing internal.

use crate::engine::{Engine, EngineError};
use crate::query::ListQuery;
use crate::sources::{HookOutcome, Sources};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rbb_schema::api;
use serde::Deserialize;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// What the handlers reach: the engine, the change sources behind the webhooks, and the
/// token control actions need.
#[derive(Clone)]
pub struct App {
    pub engine: Arc<Engine>,
    pub sources: Option<Arc<Sources>>,
    pub api_token: Option<String>,
}

impl axum::extract::FromRef<App> for Arc<Engine> {
    fn from_ref(app: &App) -> Arc<Engine> {
        app.engine.clone()
    }
}

/// One endpoint: how the OpenAPI document describes it, and its handler.
pub struct Endpoint {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// Needs `Authorization: Bearer <api_token>`.
    pub control: bool,
    /// A list endpoint taking filters, `order`, `limit` and `offset` over this item type.
    pub list_of: Option<&'static str>,
    /// Schema of a 2xx JSON answer (a component name), if any.
    pub answers: Option<&'static str>,
    /// Schema of the JSON request body, if any.
    pub body: Option<&'static str>,
    handler: axum::routing::MethodRouter<App>,
}

fn ep(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    handler: axum::routing::MethodRouter<App>,
) -> Endpoint {
    Endpoint { method, path, summary, control: false, list_of: None, answers: None, body: None, handler }
}

impl Endpoint {
    fn control(mut self) -> Self {
        self.control = true;
        self
    }
    fn list(mut self, item: &'static str) -> Self {
        self.list_of = Some(item);
        self
    }
    fn answers(mut self, schema: &'static str) -> Self {
        self.answers = Some(schema);
        self
    }
    fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }
}

/// Every endpoint of the API. The router and the OpenAPI document are both made from this
/// table, so they cannot disagree.
pub fn endpoints() -> Vec<Endpoint> {
    vec![
        ep("get", "/api/v2/builders", "Builders of the current plan, with their last build", get(builders))
            .list("Builder"),
        ep("post", "/api/v2/builders/{builder}/force", "Force a build (builder id URL-encoded)", post(force))
            .control()
            .body("ForceRequest")
            .answers("ForceResponse"),
        ep(
            "get",
            "/api/v2/builders/{builder}",
            "One builder with its 50 newest builds (builder id URL-encoded)",
            get(builder_page),
        ),
        ep("get", "/api/v2/buildrequests", "Builds waiting to start, oldest first", get(build_requests))
            .list("BuildRequest"),
        ep("post", "/api/v2/buildrequests/{id}/cancel", "Cancel a build that has not started", post(cancel_request))
            .control(),
        ep("get", "/api/v2/builds", "Builds, newest first", get(builds)).list("Build"),
        ep("get", "/api/v2/builds/{id}", "One build with its steps", get(build)).answers("Build"),
        ep("get", "/api/v2/builds/{id}/steps", "The steps of a build", get(steps)).list("Step"),
        ep("post", "/api/v2/builds/{id}/stop", "Stop a build (a running step's process group is killed)", post(stop))
            .control(),
        ep("post", "/api/v2/builds/{id}/rebuild", "Run a build again with its pinned plan", post(rebuild)).control(),
        ep("get", "/api/v2/changes", "The change log: commits seen on watched branches", get(changes)).list("Change"),
        ep("get", "/api/v2/workers", "Workers and whether they are connected", get(workers)).list("Worker"),
        ep("get", "/api/v2/repositories", "Watched repositories and how their fetches go", get(repositories)),
        ep("get", "/api/v2/logs/{id}", "A log's size and whether it is complete", get(log_meta)),
        ep("get", "/api/v2/logs/{id}/raw", "A log's bytes; supports Range and ?offset=&limit=", get(log_raw)),
        ep("get", "/api/v2/plan", "The compiled plan (the central DAG)", get(plan)).answers("Plan"),
        ep("get", "/api/v2/grid", "Builders × recent commits with the newest build of each, in one request", get(grid)),
        ep("get", "/api/v2/events", "Live events (Server-Sent Events): build, step, log, worker", get(events)),
        ep("post", "/api/v2/hooks/{forge}", "Webhook of a forge: github, gitlab, gitea or forgejo", post(hook)),
        ep("get", "/api/v2/openapi.json", "This document", get(openapi)),
    ]
}

pub fn router(engine: Arc<Engine>) -> Router {
    router_with(engine, None, None)
}

pub fn router_with(engine: Arc<Engine>, sources: Option<Arc<Sources>>, api_token: Option<String>) -> Router {
    let mut r: Router<App> = Router::new();
    for e in endpoints() {
        r = r.route(e.path, e.handler);
    }
    r = r.route("/git/{*path}", axum::routing::any(crate::git_http::serve));
    r.merge(crate::ui::router()).fallback(not_found).with_state(App { engine, sources, api_token })
}

/// Checks the bearer token of a control action.
fn authorize(app: &App, headers: &HeaderMap) -> ApiResult<()> {
    let Some(want) = &app.api_token else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
        Some(_) => {
            tracing::warn!("a control request with a wrong API token was refused");
            Err(ApiError(StatusCode::UNAUTHORIZED, "unauthorized".into(), "wrong API token".into()))
        }
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "unauthorized".into(),
            "this action needs `Authorization: Bearer <api_token>`".into(),
        )),
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub struct ApiError(StatusCode, String, String);

impl ApiError {
    fn not_found(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, "not_found".into(), msg.into())
    }
    fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, "bad_request".into(), msg.into())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::NotFound(m) => ApiError::not_found(m),
            EngineError::BadRequest(m) => ApiError::bad_request(m),
            EngineError::Conflict(m) => ApiError(StatusCode::CONFLICT, "conflict".into(), m),
            other => {
                tracing::error!(error = %other, "internal error serving a request");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal".into(),
                    "internal error; see the master's log".into(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = api::ErrorBody { error: api::ErrorDetail { code: self.1, message: self.2 } };
        (self.0, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// A request's query pairs, decoded (a malformed query string becomes a 400 in our shape).
type Pairs = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// Field names of a REST type (its JSON Schema's properties), computed once per type.
fn fields_of<T: schemars::JsonSchema>() -> Arc<Vec<String>> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Arc<Vec<String>>>>> =
        std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(T::schema_name().into_owned())
        .or_insert_with(|| {
            let schema = schemars::schema_for!(T);
            Arc::new(
                schema
                    .as_object()
                    .and_then(|o| o.get("properties"))
                    .and_then(|p| p.as_object())
                    .map(|p| p.keys().cloned().collect())
                    .unwrap_or_default(),
            )
        })
        .clone()
}

/// A filtered, ordered page of `items` as `{ name: [...], meta: { total } }`.
fn list<T: serde::Serialize + schemars::JsonSchema>(
    name: &str,
    items: Vec<T>,
    query: Pairs,
    extra: &[&str],
) -> ApiResult<Json<serde_json::Value>> {
    let Query(pairs) = query.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let fields = fields_of::<T>();
    let names: Vec<&str> = fields.iter().map(String::as_str).collect();
    let q = ListQuery::parse(&pairs, &names, extra).map_err(ApiError::bad_request)?;
    let values: Vec<serde_json::Value> = items.iter().filter_map(|i| serde_json::to_value(i).ok()).collect();
    let (page, total) = q.apply(values);
    Ok(Json(serde_json::json!({ name: page, "meta": api::Meta { total } })))
}

async fn builders(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    list("builders", e.builders(), q, &[])
}

/// The builder page in one request: its definition and its newest builds.
async fn builder_page(State(e): State<Arc<Engine>>, Path(builder): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let b = e
        .builders()
        .into_iter()
        .find(|b| b.id == builder)
        .ok_or_else(|| ApiError::not_found(format!("no builder `{builder}`")))?;
    let builds: Vec<api::Build> = e.builds_of(&builder, 50)?;
    Ok(Json(serde_json::json!({ "builder": b, "builds": builds })))
}

async fn build_requests(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    list("buildrequests", e.build_requests(), q, &[])
}

async fn cancel_request(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<StatusCode> {
    authorize(&app, &headers)?;
    let id = parse_id(&id, "build request")?;
    app.engine.cancel_request(id)?;
    Ok(StatusCode::ACCEPTED)
}

async fn force(
    State(app): State<App>,
    Path(builder): Path<String>,
    headers: HeaderMap,
    body: Option<Json<serde_json::Value>>,
) -> ApiResult<(StatusCode, Json<api::ForceResponse>)> {
    authorize(&app, &headers)?;
    let e = app.engine.clone();
    let req: api::ForceRequest = match body {
        None => api::ForceRequest::default(),
        Some(Json(v)) => {
            serde_json::from_value(v).map_err(|err| ApiError::bad_request(format!("bad force request: {err}")))?
        }
    };
    let engine = e.clone();
    let resp = tokio::task::spawn_blocking(move || engine.force(&builder, req))
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))??;
    Ok((StatusCode::CREATED, Json(resp)))
}

async fn builds(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    let q = parse_query::<api::Build>(q)?;
    let (page, total) = blocking(move || e.list_builds(&q)).await?;
    Ok(Json(serde_json::json!({ "builds": page, "meta": api::Meta { total } })))
}

/// A list query checked against `T`'s fields.
fn parse_query<T: schemars::JsonSchema>(query: Pairs) -> ApiResult<ListQuery> {
    let Query(pairs) = query.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let fields = fields_of::<T>();
    let names: Vec<&str> = fields.iter().map(String::as_str).collect();
    ListQuery::parse(&pairs, &names, &[]).map_err(ApiError::bad_request)
}

/// Runs a store read off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::engine::EngineError> + Send + 'static,
) -> ApiResult<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))??)
}

fn parse_id(raw: &str, what: &str) -> ApiResult<u64> {
    raw.parse().map_err(|_| ApiError::bad_request(format!("`{raw}` is not a {what} id (a number)")))
}

async fn build(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<Json<api::Build>> {
    let id = parse_id(&id, "build")?;
    e.build(id).map(Json).ok_or_else(|| ApiError::not_found(format!("no build {id}")))
}

async fn steps(State(e): State<Arc<Engine>>, Path(id): Path<String>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id, "build")?;
    let b = e.build(id).ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    list("steps", b.steps, q, &[])
}

async fn stop(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<StatusCode> {
    authorize(&app, &headers)?;
    let id = parse_id(&id, "build")?;
    app.engine.stop(id, "stopped through the API")?;
    Ok(StatusCode::ACCEPTED)
}

async fn workers(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    list("workers", e.workers(), q, &[])
}

async fn repositories(State(app): State<App>) -> Json<serde_json::Value> {
    let repos = app.sources.map(|s| s.health()).unwrap_or_default();
    Json(serde_json::json!({ "repositories": repos, "meta": { "total": repos.len() } }))
}

async fn plan(State(e): State<Arc<Engine>>) -> Json<rbb_schema::plan::Plan> {
    Json((*e.plan()).clone())
}

async fn log_meta(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id, "log")?;
    let (rec, _, live) = e.log(id).ok_or_else(|| ApiError::not_found(format!("no log {id}")))?;
    Ok(Json(serde_json::json!({
        "id": rec.id, "build": rec.build, "step": rec.step, "bytes": rec.bytes, "complete": !live,
        "expired": rec.expired,
    })))
}

#[derive(Deserialize)]
struct RangeQuery {
    offset: Option<u64>,
    limit: Option<u64>,
}

/// The log's bytes, whole or a range (`Range: bytes=a-b`, or `?offset=&limit=`), streamed
/// from the file: memory use does not depend on the log's size.
async fn log_raw(
    State(e): State<Arc<Engine>>,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = parse_id(&id, "log")?;
    let (rec, path, _) = e.log(id).ok_or_else(|| ApiError::not_found(format!("no log {id}")))?;
    if rec.expired {
        return Err(ApiError(
            StatusCode::GONE,
            "gone".into(),
            format!("log {id} expired: the retention policy deleted it"),
        ));
    }
    let len = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
    let mut start = q.offset.unwrap_or(0);
    let mut end = q.limit.map_or(len, |l| start.saturating_add(l).min(len));
    let mut partial = q.offset.is_some() || q.limit.is_some();
    if let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        let spec = range
            .strip_prefix("bytes=")
            .ok_or_else(|| ApiError::bad_request(format!("unsupported Range `{range}`")))?;
        let (a, b) = spec.split_once('-').ok_or_else(|| ApiError::bad_request(format!("bad Range `{range}`")))?;
        if a.is_empty() {
            let n: u64 = b.parse().map_err(|_| ApiError::bad_request(format!("bad Range `{range}`")))?;
            start = len.saturating_sub(n);
            end = len;
        } else {
            start = a.parse().map_err(|_| ApiError::bad_request(format!("bad Range `{range}`")))?;
            end = if b.is_empty() {
                len
            } else {
                b.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("bad Range `{range}`")))?
                    .saturating_add(1)
                    .min(len)
            };
        }
        if start > len {
            return Ok(Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap_or_default());
        }
        partial = true;
    }
    let start = start.min(len);
    let end = end.max(start).min(len);
    let mut file =
        tokio::fs::File::open(&path).await.map_err(|_| ApiError::not_found(format!("log {id} has no file yet")))?;
    file.seek(std::io::SeekFrom::Start(start)).await.map_err(EngineError::Io)?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(end - start), 256 * 1024);
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("x-rbb-log-size", len);
    if partial {
        resp = resp
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end.saturating_sub(1).max(start)));
    }
    Ok(resp.body(Body::from_stream(stream)).unwrap_or_default())
}

async fn rebuild(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    authorize(&app, &headers)?;
    let id = parse_id(&id, "build")?;
    let engine = app.engine.clone();
    let new = tokio::task::spawn_blocking(move || engine.rebuild(id))
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))??;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "build": new }))))
}

async fn changes(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    let q = parse_query::<api::Change>(q)?;
    let (page, total) = blocking(move || e.list_changes(&q)).await?;
    Ok(Json(serde_json::json!({ "changes": page, "meta": api::Meta { total } })))
}

#[derive(Deserialize)]
struct GridQuery {
    limit: Option<usize>,
}

/// `GET /api/v2/grid`: what the grid page shows, in one answer.
async fn grid(State(e): State<Arc<Engine>>, Query(q): Query<GridQuery>) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(50);
    if limit > 500 {
        return Err(ApiError::bad_request("limit may be at most 500 columns"));
    }
    Ok(Json(blocking(move || e.grid(limit)).await?))
}

/// `GET /api/v2/events`: build, step, log and worker events as Server-Sent Events. Log
/// progress travels on its own channel, so a busy log never pushes build events out; a
/// client too slow for either gets a `reset` event (reload what you show) instead of a
/// silent gap.
async fn events(
    State(e): State<Arc<Engine>>,
) -> axum::response::sse::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>
{
    use axum::response::sse::{Event as Sse, KeepAlive};
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
    let to_sse = |ev: Result<crate::engine::Event, BroadcastStreamRecvError>| {
        let (kind, data) = match ev {
            Ok(crate::engine::Event::Build { id }) => ("build", serde_json::json!({ "id": id })),
            Ok(crate::engine::Event::Step { build, step }) => {
                ("step", serde_json::json!({ "build": build, "step": step }))
            }
            Ok(crate::engine::Event::Log { id, bytes }) => ("log", serde_json::json!({ "id": id, "bytes": bytes })),
            Ok(crate::engine::Event::Worker { name }) => ("worker", serde_json::json!({ "name": name })),
            Err(BroadcastStreamRecvError::Lagged(n)) => ("reset", serde_json::json!({ "missed": n })),
        };
        Ok(Sse::default().event(kind).data(data.to_string()))
    };
    let stream =
        BroadcastStream::new(e.subscribe()).map(to_sse).merge(BroadcastStream::new(e.subscribe_logs()).map(to_sse));
    axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document(&endpoints()))
}

/// `POST /api/v2/hooks/{github,gitlab,gitea,forgejo}`: a forge's webhook.
async fn hook(
    State(app): State<App>,
    Path(forge): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let Some(f) = crate::webhooks::Forge::from_path(&forge) else {
        return Err(ApiError::not_found(format!("no webhook for `{forge}` (github, gitlab, gitea, forgejo)")));
    };
    let Some(sources) = app.sources.clone() else {
        return Err(ApiError::not_found("this master has no change sources"));
    };
    let header_pairs: Vec<(String, String)> =
        headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned()))).collect();
    let outcome = sources.webhook(&app.engine, f, &header_pairs, &body).await;
    let (status, code, message) = match outcome {
        HookOutcome::Unsigned(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m),
        HookOutcome::Refused(m) => (StatusCode::FORBIDDEN, "forbidden", m),
        HookOutcome::Bad(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
        HookOutcome::Accepted(m) => {
            return Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "accepted": m }))).into_response());
        }
        HookOutcome::Ignored(m) => {
            return Ok((StatusCode::OK, Json(serde_json::json!({ "ignored": m }))).into_response());
        }
    };
    tracing::warn!(forge = %forge, status = status.as_u16(), reason = %message, "webhook refused");
    Err(ApiError(status, code.into(), message))
}
