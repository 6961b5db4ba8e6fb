//! The REST API (`/api/v2`), over the [`Engine`]'s queries and actions. Errors share one JSON
//! shape ([`rbb_schema::api::ErrorBody`]); server errors reveal nothing internal.

use crate::engine::{Engine, EngineError};
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

/// What the handlers reach: the engine, and the change sources behind the webhooks.
#[derive(Clone)]
pub struct App {
    pub engine: Arc<Engine>,
    pub sources: Option<Arc<Sources>>,
}

impl axum::extract::FromRef<App> for Arc<Engine> {
    fn from_ref(app: &App) -> Arc<Engine> {
        app.engine.clone()
    }
}

pub fn router(engine: Arc<Engine>) -> Router {
    router_with(engine, None)
}

pub fn router_with(engine: Arc<Engine>, sources: Option<Arc<Sources>>) -> Router {
    Router::new()
        .route("/api/v2/builders", get(builders))
        .route("/api/v2/builders/{builder}/force", post(force))
        .route("/api/v2/builds", get(builds))
        .route("/api/v2/builds/{id}", get(build))
        .route("/api/v2/builds/{id}/steps", get(steps))
        .route("/api/v2/builds/{id}/stop", post(stop))
        .route("/api/v2/logs/{id}", get(log_meta))
        .route("/api/v2/logs/{id}/raw", get(log_raw))
        .route("/api/v2/builds/{id}/rebuild", post(rebuild))
        .route("/api/v2/changes", get(changes))
        .route("/api/v2/hooks/{forge}", post(hook))
        .route("/api/v2/workers", get(workers))
        .route("/api/v2/plan", get(plan))
        .fallback(not_found)
        .with_state(App { engine, sources })
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
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error; see the master's log".into())
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

fn list<T: serde::Serialize>(name: &str, items: Vec<T>) -> Json<serde_json::Value> {
    let total = items.len();
    Json(serde_json::json!({ name: items, "meta": api::Meta { total } }))
}

async fn builders(State(e): State<Arc<Engine>>) -> Json<serde_json::Value> {
    list("builders", e.builders())
}

async fn force(
    State(e): State<Arc<Engine>>,
    Path(builder): Path<String>,
    body: Option<Json<serde_json::Value>>,
) -> ApiResult<(StatusCode, Json<api::ForceResponse>)> {
    let req: api::ForceRequest = match body {
        None => api::ForceRequest::default(),
        Some(Json(v)) => serde_json::from_value(v).map_err(|err| ApiError::bad_request(format!("bad force request: {err}")))?,
    };
    let engine = e.clone();
    let resp = tokio::task::spawn_blocking(move || engine.force(&builder, req))
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))??;
    Ok((StatusCode::CREATED, Json(resp)))
}

#[derive(Deserialize)]
struct BuildsQuery {
    builder: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn builds(State(e): State<Arc<Engine>>, Query(q): Query<BuildsQuery>) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100);
    if limit > 1000 {
        return Err(ApiError::bad_request("limit may be at most 1000"));
    }
    let all = e.builds(q.builder.as_deref());
    let total = all.len();
    let page: Vec<api::Build> = all.into_iter().skip(q.offset.unwrap_or(0)).take(limit).collect();
    Ok(Json(serde_json::json!({ "builds": page, "meta": api::Meta { total } })))
}

fn parse_id(raw: &str, what: &str) -> ApiResult<u64> {
    raw.parse().map_err(|_| ApiError::bad_request(format!("`{raw}` is not a {what} id (a number)")))
}

async fn build(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<Json<api::Build>> {
    let id = parse_id(&id, "build")?;
    e.build(id).map(Json).ok_or_else(|| ApiError::not_found(format!("no build {id}")))
}

async fn steps(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id, "build")?;
    let b = e.build(id).ok_or_else(|| ApiError::not_found(format!("no build {id}")))?;
    Ok(list("steps", b.steps))
}

async fn stop(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "build")?;
    e.stop(id, "stopped through the API")?;
    Ok(StatusCode::ACCEPTED)
}

async fn workers(State(e): State<Arc<Engine>>) -> Json<serde_json::Value> {
    list("workers", e.workers())
}

async fn plan(State(e): State<Arc<Engine>>) -> Json<rbb_schema::plan::Plan> {
    Json((*e.plan()).clone())
}

async fn log_meta(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<Json<serde_json::Value>> {
    let id = parse_id(&id, "log")?;
    let (rec, _, live) = e.log(id).ok_or_else(|| ApiError::not_found(format!("no log {id}")))?;
    Ok(Json(serde_json::json!({ "id": rec.id, "build": rec.build, "step": rec.step, "bytes": rec.bytes, "complete": !live })))
}

#[derive(Deserialize)]
struct RawQuery {
    offset: Option<u64>,
    limit: Option<u64>,
}

/// The log's bytes, whole or a range (`Range: bytes=a-b`, or `?offset=&limit=`), streamed
/// from the file: memory use does not depend on the log's size.
async fn log_raw(
    State(e): State<Arc<Engine>>,
    Path(id): Path<String>,
    Query(q): Query<RawQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = parse_id(&id, "log")?;
    let (_, path, _) = e.log(id).ok_or_else(|| ApiError::not_found(format!("no log {id}")))?;
    let len = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
    let mut start = q.offset.unwrap_or(0);
    let mut end = q.limit.map_or(len, |l| start.saturating_add(l).min(len));
    let mut partial = q.offset.is_some() || q.limit.is_some();
    if let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        let spec = range.strip_prefix("bytes=").ok_or_else(|| ApiError::bad_request(format!("unsupported Range `{range}`")))?;
        let (a, b) = spec.split_once('-').ok_or_else(|| ApiError::bad_request(format!("bad Range `{range}`")))?;
        if a.is_empty() {
            let n: u64 = b.parse().map_err(|_| ApiError::bad_request(format!("bad Range `{range}`")))?;
            start = len.saturating_sub(n);
            end = len;
        } else {
            start = a.parse().map_err(|_| ApiError::bad_request(format!("bad Range `{range}`")))?;
            end = if b.is_empty() { len } else { b.parse::<u64>().map_err(|_| ApiError::bad_request(format!("bad Range `{range}`")))?.saturating_add(1).min(len) };
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
    let mut file = tokio::fs::File::open(&path).await.map_err(|_| ApiError::not_found(format!("log {id} has no file yet")))?;
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

async fn rebuild(State(e): State<Arc<Engine>>, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let id = parse_id(&id, "build")?;
    let engine = e.clone();
    let new = tokio::task::spawn_blocking(move || engine.rebuild(id))
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))??;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "build": new }))))
}

async fn changes(State(e): State<Arc<Engine>>, Query(q): Query<BuildsQuery>) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100);
    if limit > 1000 {
        return Err(ApiError::bad_request("limit may be at most 1000"));
    }
    let all = e.changes();
    let total = all.len();
    let page: Vec<_> = all.into_iter().skip(q.offset.unwrap_or(0)).take(limit).collect();
    Ok(Json(serde_json::json!({ "changes": page, "meta": api::Meta { total } })))
}

/// `POST /api/v2/hooks/{github,gitlab,gitea,forgejo}`: a forge's webhook.
async fn hook(State(app): State<App>, Path(forge): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> ApiResult<Response> {
    let Some(f) = crate::webhooks::Forge::from_path(&forge) else {
        return Err(ApiError::not_found(format!("no webhook for `{forge}` (github, gitlab, gitea, forgejo)")));
    };
    let Some(sources) = app.sources.clone() else {
        return Err(ApiError::not_found("this master has no change sources"));
    };
    let pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), v.to_owned())))
        .collect();
    let outcome = sources.webhook(&app.engine, f, &pairs, &body).await;
    let (status, code, message) = match outcome {
        HookOutcome::Unsigned(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m),
        HookOutcome::Refused(m) => (StatusCode::FORBIDDEN, "forbidden", m),
        HookOutcome::Bad(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
        HookOutcome::Accepted(m) => return Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "accepted": m }))).into_response()),
        HookOutcome::Ignored(m) => return Ok((StatusCode::OK, Json(serde_json::json!({ "ignored": m }))).into_response()),
    };
    tracing::warn!(forge = %forge, status = status.as_u16(), reason = %message, "webhook refused");
    Err(ApiError(status, code.into(), message))
}
