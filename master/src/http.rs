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
use rbb_schema::config::Access;
use serde::Deserialize;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// What the handlers reach: the engine, the change sources behind the webhooks, and who may
/// do what (tokens, rate limits).
#[derive(Clone)]
pub struct App {
    pub engine: Arc<Engine>,
    pub sources: Option<Arc<Sources>>,
    pub security: Arc<Security>,
    /// The numbered event stream, started with the first client (it needs the runtime).
    pub live: Arc<std::sync::OnceLock<Arc<crate::live::Live>>>,
}

impl axum::extract::FromRef<App> for Arc<Engine> {
    fn from_ref(app: &App) -> Arc<Engine> {
        app.engine.clone()
    }
}

/// What a successful answer carries, for the OpenAPI document.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// JSON of this component schema.
    Json(&'static str),
    /// A JSON object described in prose.
    AnyJson,
    /// `text/plain` bytes.
    Text,
    /// A `text/event-stream`.
    EventStream,
    /// No body.
    Empty,
}

/// One endpoint: how the OpenAPI document describes it, and its handler.
pub struct Endpoint {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// The role a caller needs (`none`: anyone). `None` here is an endpoint whose role was
    /// not declared: the router refuses it to everyone but admins, and a test fails.
    pub access: Option<Access>,
    /// The action's name in the audit log, for control and admin actions.
    pub audit: Option<&'static str>,
    /// A list endpoint taking filters, `order`, `limit` and `offset` over this item type
    /// (answers 200 with a page, 400 for a bad query).
    pub list_of: Option<&'static str>,
    /// Successful answers: status and body.
    pub answers: Vec<(u16, Answer)>,
    /// Error statuses the handler answers besides those implied by `control`, `list_of` and
    /// `body` (always in the one error shape).
    pub errors: &'static [u16],
    /// Schema of the JSON request body, if any.
    pub body: Option<&'static str>,
    /// Query parameters of an endpoint that is not a generic list: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    handler: axum::routing::MethodRouter<App>,
}

fn ep(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    handler: axum::routing::MethodRouter<App>,
) -> Endpoint {
    Endpoint {
        method,
        path,
        summary,
        access: None,
        audit: None,
        list_of: None,
        answers: Vec::new(),
        errors: &[],
        body: None,
        query: &[],
        handler,
    }
}

impl Endpoint {
    /// Anyone may call it (it reveals no build data, or it checks its own credentials).
    fn public(mut self) -> Self {
        self.access = Some(Access::None);
        self
    }
    /// Viewing: builds, logs, workers, events.
    fn read(mut self) -> Self {
        self.access = Some(Access::Read);
        self
    }
    /// A control action (force, stop, rebuild, cancel), audited as `action`.
    fn control(mut self, action: &'static str) -> Self {
        self.access = Some(Access::Control);
        self.audit = Some(action);
        self
    }
    /// An admin action (the step cache's), audited as `action`.
    fn admin(mut self, action: &'static str) -> Self {
        self.access = Some(Access::Admin);
        self.audit = Some(action);
        self
    }
    /// Reading that needs a role above `read` (the audit log).
    fn needs(mut self, role: Access) -> Self {
        self.access = Some(role);
        self
    }
    /// Whether it is a forge's webhook (limited per forge and client address).
    pub fn is_webhook(&self) -> bool {
        self.path.starts_with("/api/v2/hooks/")
    }
    fn list(mut self, item: &'static str) -> Self {
        self.list_of = Some(item);
        self
    }
    fn answers(mut self, status: u16, answer: Answer) -> Self {
        self.answers.push((status, answer));
        self
    }
    fn errors(mut self, codes: &'static [u16]) -> Self {
        self.errors = codes;
        self
    }
    fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }
    fn query(mut self, params: &'static [(&'static str, &'static str)]) -> Self {
        self.query = params;
        self
    }
}

/// Every endpoint of the API. The router and the OpenAPI document are both made from this
/// table, so they cannot disagree.
pub fn endpoints() -> Vec<Endpoint> {
    use Answer::*;
    vec![
        ep("get", "/api/v2/builders", "Builders of the current plan, with their last build", get(builders))
            .read()
            .list("Builder"),
        ep(
            "post",
            "/api/v2/builders/{builder}/force",
            "Force a build (builder id URL-encoded; a matrix builder's base name forces every combination)",
            post(force),
        )
        .control("force")
        .body("ForceRequest")
        .answers(201, Json("Forced"))
        .errors(&[400, 404]),
        ep(
            "get",
            "/api/v2/builders/{builder}",
            "One builder with its 50 newest builds (builder id URL-encoded)",
            get(builder_page),
        )
        .read()
        .answers(200, Json("BuilderPage"))
        .errors(&[404]),
        ep("get", "/api/v2/buildrequests", "Builds waiting to start, oldest first", get(build_requests))
            .read()
            .list("BuildRequest"),
        ep("post", "/api/v2/buildrequests/{id}/cancel", "Cancel a build that has not started", post(cancel_request))
            .control("cancel")
            .answers(202, Empty)
            .errors(&[400, 404, 409]),
        ep("get", "/api/v2/builds", "Builds, newest first", get(builds)).read().list("Build"),
        ep("get", "/api/v2/builds/{id}", "One build with its steps", get(build))
            .read()
            .answers(200, Json("Build"))
            .errors(&[400, 404]),
        ep("get", "/api/v2/builds/{id}/steps", "The steps of a build", get(steps)).read().list("Step").errors(&[400, 404]),
        ep("post", "/api/v2/builds/{id}/stop", "Stop a build (a running step's process group is killed)", post(stop))
            .control("stop")
            .answers(202, Empty)
            .errors(&[400, 404, 409]),
        ep("post", "/api/v2/builds/{id}/rebuild", "Run a finished build again with its pinned plan", post(rebuild))
            .control("rebuild")
            .answers(201, Json("Rebuilt"))
            .errors(&[400, 404, 409]),
        ep("get", "/api/v2/changes", "The change log: commits seen on watched branches", get(changes)).read().list("Change"),
        ep("get", "/api/v2/workers", "Workers and whether they are connected", get(workers)).read().list("Worker"),
        ep("get", "/api/v2/repositories", "Watched repositories and how their fetches go", get(repositories))
            .read()
            .answers(200, AnyJson),
        ep(
            "get",
            "/api/v2/statuses",
            "Commit statuses and how their delivery to the forge goes, newest first",
            get(statuses),
        )
        .read()
        .query(STATUS_QUERY)
        .answers(200, Json("StatusList"))
        .errors(&[400]),
        ep("get", "/api/v2/logs/{id}", "A log's size and whether it is complete", get(log_meta))
            .read()
            .answers(200, Json("LogMeta"))
            .errors(&[400, 404]),
        ep("get", "/api/v2/logs/{id}/raw", "A log's bytes; supports Range and ?offset=&limit=", get(log_raw))
            .read()
            .answers(200, Text)
            .answers(206, Text)
            .errors(&[400, 404]),
        ep(
            "get",
            "/api/v2/logs/{id}/streams",
            "Which stream (stdout, stderr, header) a log's bytes came from: the runs overlapping ?offset=&limit=",
            get(log_streams),
        )
        .read()
        .answers(200, Json("LogStreams"))
        .errors(&[400, 404]),
        ep("get", "/api/v2/plan", "The compiled plan (the central DAG)", get(plan)).read().answers(200, Json("Plan")),
        ep("get", "/api/v2/grid", "Builders × recent commits with the newest build of each, in one request", get(grid))
            .read()
            .answers(200, Json("Grid"))
            .errors(&[400]),
        ep(
            "get",
            "/api/v2/events",
            "Live events (Server-Sent Events with ids): build, step, log, worker, and reset (reload what you show); send Last-Event-ID to resume",
            get(events),
        )
        .read()
        .answers(200, EventStream),
        ep("post", "/api/v2/hooks/{forge}", "Webhook of a forge: github, gitlab, gitea or forgejo", post(hook))
            .public()
            .answers(200, AnyJson)
            .answers(202, AnyJson)
            .errors(&[400, 401, 403, 404, 413]),
        ep(
            "get",
            "/api/v2/cache",
            "The step cache: entries, blobs, stored bytes, the size limit, and hits and misses per builder",
            get(cache_stats),
        )
        .read()
        .answers(200, Json("CacheStats")),
        ep(
            "post",
            "/api/v2/cache/gc",
            "Hold the step cache to its size limit now (least recently used entries first); answers what was removed",
            post(cache_gc),
        )
        .admin("cache_gc")
        .answers(200, Json("CacheGc")),
        ep(
            "post",
            "/api/v2/builders/{builder}/cache/reset",
            "Make the builder's cacheable steps run once again: its cache epoch grows, so their keys change (builder id URL-encoded)",
            post(cache_reset),
        )
        .admin("cache_reset")
        .answers(200, Json("CacheReset"))
        .errors(&[404]),
        ep("get", "/api/v2/whoami", "Who the master takes the caller for: token name and role", get(whoami))
            .public()
            .answers(200, Json("WhoAmI")),
        ep(
            "get",
            "/api/v2/audit",
            "The audit log: control and admin actions, newest first (?limit=, ?before=<id> for older pages)",
            get(audit_log),
        )
        .needs(Access::Control)
        .query(AUDIT_QUERY)
        .answers(200, Json("AuditList"))
        .errors(&[400]),
        ep("get", "/api/v2/openapi.json", "This document", get(openapi)).public().answers(200, AnyJson),
    ]
}

pub fn router(engine: Arc<Engine>) -> Router {
    router_with(engine, None, None)
}

/// The router of a master configured with a single `api_token` (an admin token; anyone
/// reads) or none (everything open), with the default rate limits.
pub fn router_with(engine: Arc<Engine>, sources: Option<Arc<Sources>>, api_token: Option<String>) -> Router {
    let cfg = rbb_schema::config::MasterConfig { api_token, ..Default::default() };
    let security = Security::from_config(&cfg).unwrap_or_else(|_| Security::open());
    router_secured(engine, sources, Arc::new(security))
}

/// Who may do what over HTTP: the tokens, and the rate limits of webhooks and control actions.
pub struct Security {
    pub tokens: crate::auth::Tokens,
    webhooks: crate::ratelimit::Limiter,
    control: crate::ratelimit::Limiter,
}

impl Security {
    /// Everything open to everyone, default rate limits.
    pub fn open() -> Security {
        Security {
            tokens: crate::auth::Tokens::open(),
            webhooks: default_limiter(crate::ratelimit::WEBHOOKS),
            control: default_limiter(crate::ratelimit::CONTROL),
        }
    }

    /// From the master config's `tokens`, `api_token`, `anonymous` and `rate_limits`; a
    /// mistake is an error naming the field.
    pub fn from_config(cfg: &rbb_schema::config::MasterConfig) -> Result<Security, String> {
        let limits = cfg.rate_limits.clone().unwrap_or_default();
        let webhooks =
            crate::ratelimit::Limiter::new(limits.webhooks.unwrap_or(crate::ratelimit::WEBHOOKS), "webhooks")?;
        let control = crate::ratelimit::Limiter::new(limits.control.unwrap_or(crate::ratelimit::CONTROL), "control")?;
        Ok(Security { tokens: crate::auth::Tokens::from_config(cfg)?, webhooks, control })
    }
}

fn default_limiter(cfg: rbb_schema::config::BucketConfig) -> crate::ratelimit::Limiter {
    match crate::ratelimit::Limiter::new(cfg, "default") {
        Ok(l) => l,
        // The defaults are positive constants.
        Err(_) => unreachable!("default rate limits are valid"),
    }
}

/// The router of a master: every endpoint of [`endpoints`] behind its role check, rate limit
/// and audit record, the mirrors for workers, and the UI.
pub fn router_secured(engine: Arc<Engine>, sources: Option<Arc<Sources>>, security: Arc<Security>) -> Router {
    let app = App { engine, sources, security, live: Default::default() };
    let mut r: Router<App> = Router::new();
    for e in endpoints() {
        let rule = Arc::new(Rule {
            // An endpoint without a declared role is for admins only (and fails the role test).
            access: e.access.unwrap_or(Access::Admin),
            audit: e.audit,
            webhook: e.is_webhook(),
            needs_plan: e.path.starts_with("/api/v2/builders") || ["/api/v2/plan", "/api/v2/grid"].contains(&e.path),
        });
        let layer = axum::middleware::from_fn_with_state((app.clone(), rule), guard);
        r = r.route(e.path, e.handler.route_layer(layer));
    }
    r = r.route("/git/{*path}", axum::routing::any(crate::git_http::serve));
    r.merge(crate::ui::router()).fallback(not_found).layer(axum::middleware::map_response(error_shape)).with_state(app)
}

/// What [`guard`] enforces for one endpoint.
struct Rule {
    access: Access,
    audit: Option<&'static str>,
    webhook: bool,
    /// The answer comes from the head plan: while the master starts, it waits for it.
    needs_plan: bool,
}

/// How long a request that needs the head plan waits for it while the master starts.
const PLAN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The client's address, when the server recorded it (in-process tests have none).
fn client_addr(req: &axum::extract::Request) -> Option<std::net::SocketAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0)
}

fn too_many(wait: std::time::Duration, what: &str) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp =
        ApiError(StatusCode::TOO_MANY_REQUESTS, "rate_limited".into(), format!("too many {what}; retry in {secs} s"))
            .into_response();
    resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    resp
}

/// Runs before every endpoint: rate limits webhooks, identifies the caller, answers 401 (no
/// or wrong token) or 403 (a token whose role is too low), limits control actions per caller,
/// and records control and admin actions in the audit log with how they ended.
async fn guard(
    State((app, rule)): State<(App, Arc<Rule>)>,
    params: axum::extract::RawPathParams,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let addr = client_addr(&req);
    let ip = addr.map_or_else(|| "local".to_owned(), |a| a.ip().to_string());
    if rule.webhook {
        let forge = params.iter().find(|(k, _)| *k == "forge").map_or("", |(_, v)| v);
        if let Err(wait) = app.security.webhooks.take(&format!("{forge}|{ip}")) {
            return too_many(wait, "webhook deliveries");
        }
        return next.run(req).await;
    }
    let authorization = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("?"));
    let caller = app.security.tokens.caller(authorization);
    let caller = match caller {
        Ok(c) => c,
        Err(why) => {
            let message = match why {
                crate::auth::Rejected::WrongToken => "wrong API token",
                crate::auth::Rejected::Malformed => "the Authorization header must be `Bearer <token>`",
            };
            // Wrong tokens on actions are limited too: each refusal is an audit record.
            if rule.access >= Access::Control
                && let Err(wait) = app.security.control.take(&format!("ip:{ip}"))
            {
                return too_many(wait, "control requests");
            }
            tracing::warn!(peer = %ip, path = %req.uri().path(), "refused a request with a wrong API token");
            let resp = unauthorized(message.into());
            let anonymous =
                crate::auth::Caller { name: "unknown token".into(), role: Access::None, authenticated: false };
            return audited(&app, &rule, &params, &anonymous, addr, resp).await;
        }
    };
    if rule.access >= Access::Control {
        let key = if caller.authenticated { format!("token:{}", caller.name) } else { format!("ip:{ip}") };
        if let Err(wait) = app.security.control.take(&key) {
            return too_many(wait, "control requests");
        }
    }
    if caller.role < rule.access {
        let mut resp = if caller.authenticated {
            ApiError(
                StatusCode::FORBIDDEN,
                "forbidden".into(),
                format!(
                    "token `{}` has the role {}; this needs {}",
                    caller.name,
                    caller.role.name(),
                    rule.access.name()
                ),
            )
            .into_response()
        } else {
            unauthorized(format!(
                "this needs a token with the role {}: send `Authorization: Bearer <token>`",
                rule.access.name()
            ))
        };
        // The role the endpoint needs, for clients that want to ask for a better token.
        resp.headers_mut().insert("x-rbb-needs", header::HeaderValue::from_static(rule.access.name()));
        return audited(&app, &rule, &params, &caller, addr, resp).await;
    }
    if rule.needs_plan && !app.engine.heads_ready(PLAN_WAIT).await {
        let mut resp = ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting".into(),
            "the master is starting: it is still reading every repository's pipeline; retry shortly".into(),
        )
        .into_response();
        resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(5));
        return audited(&app, &rule, &params, &caller, addr, resp).await;
    }
    if req.method() == axum::http::Method::GET {
        // What a reader sees is on disk: a result a crash could still take back is not shown.
        app.engine.durable_for_readers().await;
    }
    req.extensions_mut().insert(caller.clone());
    let resp = next.run(req).await;
    audited(&app, &rule, &params, &caller, addr, resp).await
}

fn unauthorized(message: String) -> Response {
    let mut resp = ApiError(StatusCode::UNAUTHORIZED, "unauthorized".into(), message).into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"rbb\""));
    resp
}

/// Records an audited action's outcome (before answering, so the log holds every action its
/// caller saw answered) and passes the answer on.
async fn audited(
    app: &App,
    rule: &Rule,
    params: &axum::extract::RawPathParams,
    caller: &crate::auth::Caller,
    addr: Option<std::net::SocketAddr>,
    resp: Response,
) -> Response {
    let Some(action) = rule.audit else { return resp };
    let entry = api::AuditEntry {
        id: 0,
        at_ms: crate::model::now_ms(),
        who: caller.name.clone(),
        role: caller.role,
        action: action.into(),
        target: params.iter().map(|(_, v)| v).collect::<Vec<_>>().join(","),
        from: addr.map_or_else(|| "local".to_owned(), |a| a.to_string()),
        status: resp.status().as_u16(),
        result: crate::audit::result_of(resp.status().as_u16()).into(),
    };
    let engine = app.engine.clone();
    match tokio::task::spawn_blocking(move || crate::audit::record(engine.database(), entry)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, action, "cannot record an action in the audit log"),
        Err(e) => tracing::error!(error = %e, action, "audit task failed"),
    }
    resp
}

/// Gives every error answer the one JSON shape, whoever made it: axum's extractors answer
/// 400, 413, 415 and 422 in plain text and 405 with an empty body.
async fn error_shape(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.map(|b| String::from_utf8_lossy(&b).into_owned());
    let text = text.unwrap_or_default();
    let (code, fallback) = match status {
        StatusCode::BAD_REQUEST => ("bad_request", "bad request"),
        StatusCode::NOT_FOUND => ("not_found", "not found"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this path does not take this method"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "the request body's type is not supported"),
        StatusCode::UNPROCESSABLE_ENTITY => ("bad_request", "the request body does not fit its schema"),
        StatusCode::RANGE_NOT_SATISFIABLE => ("range_not_satisfiable", "the range asks for no existing byte"),
        s if s.is_server_error() => ("internal", "internal error; see the master's log"),
        _ => ("bad_request", "bad request"),
    };
    let message = if text.trim().is_empty() || status.is_server_error() { fallback.to_owned() } else { text };
    let mut out = ApiError(status, code.into(), message).into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// Hides the server's file paths in a message meant for a client: any word that is an
/// absolute path becomes `<path>`.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('/') {
        let before = &rest[..i];
        let at_word_start = before.chars().last().is_none_or(|c| c.is_whitespace() || "`'\"(:=".contains(c));
        let word_len = rest[i..].find(|c: char| c.is_whitespace() || "`'\")".contains(c)).unwrap_or(rest.len() - i);
        let word = &rest[i..i + word_len];
        out.push_str(before);
        if at_word_start && word.matches('/').count() >= 2 && !word.starts_with("/api/") {
            out.push_str("<path>");
        } else {
            out.push_str(word);
        }
        rest = &rest[i + word_len..];
    }
    out.push_str(rest);
    out
}

/// Hides the server's file paths in a fetch or delivery error but keeps URLs (which name the
/// repository or forge): a word that starts with `/` (after an opening quote) and has two or
/// more slashes becomes `<path>`, its trailing punctuation kept.
fn hide_paths(message: &str) -> String {
    message
        .split(' ')
        .map(|word| {
            let start = word.len() - word.trim_start_matches(['\'', '"', '`', '(']).len();
            let end = word.trim_end_matches(['\'', '"', '`', ')', ':', ',', ';']).len().max(start);
            let core = &word[start..end];
            if core.starts_with('/') && core.matches('/').count() >= 2 && !core.starts_with("/api/") {
                format!("{}<path>{}", &word[..start], &word[end..])
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error answer: status, code and message (file paths are scrubbed from it).
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
        let body = api::ErrorBody { error: api::ErrorDetail { code: self.1, message: scrub(&self.2) } };
        (self.0, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// A request's query pairs, decoded (a malformed query string becomes a 400 in our shape).
type Pairs = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// Fields of a REST type (its JSON Schema's properties, with their kinds), computed once per
/// type.
fn fields_of<T: schemars::JsonSchema>() -> Arc<Vec<crate::query::Field>> {
    type Cache = std::sync::Mutex<std::collections::HashMap<String, Arc<Vec<crate::query::Field>>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(T::schema_name().into_owned())
        .or_insert_with(|| {
            let schema = schemars::schema_for!(T);
            let empty = serde_json::Map::new();
            let defs = schema.as_object().and_then(|o| o.get("$defs")).and_then(|d| d.as_object()).unwrap_or(&empty);
            Arc::new(
                schema
                    .as_object()
                    .and_then(|o| o.get("properties"))
                    .and_then(|p| p.as_object())
                    .map(|p| p.iter().map(|(k, v)| crate::query::Field::from_schema(k, v, defs)).collect())
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
    let q = ListQuery::parse_typed(&pairs, &fields, extra).map_err(ApiError::bad_request)?;
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

async fn cancel_request(State(app): State<App>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "build request")?;
    app.engine.cancel_request(id)?;
    Ok(StatusCode::ACCEPTED)
}

/// Forces a builder. The body is JSON whatever its declared content type (`curl -d` sends a
/// form type); an empty body means defaults. A matrix builder's base name (`app/test`) forces
/// every combination.
async fn force(
    State(app): State<App>,
    Path(builder): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<api::Forced>)> {
    let req: api::ForceRequest = if body.iter().all(u8::is_ascii_whitespace) {
        api::ForceRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| ApiError::bad_request(format!("bad force request: {err}")))?
    };
    let plan = app.engine.plan();
    let targets: Vec<String> = if plan.builder(&builder).is_some() {
        vec![builder.clone()]
    } else {
        let combos: Vec<String> = plan
            .builders
            .iter()
            .filter(|b| !b.matrix.is_empty() && format!("{}/{}", b.repo, b.name) == builder)
            .map(|b| b.id.clone())
            .collect();
        if combos.is_empty() { vec![builder.clone()] } else { combos }
    };
    let engine = app.engine.clone();
    let resp = tokio::task::spawn_blocking(move || {
        let mut all: Option<api::Forced> = None;
        for t in &targets {
            let r = engine.force(t, req.clone())?;
            match &mut all {
                None => all = Some(api::Forced { build: r.build, builds: vec![r.build], needed: r.needed }),
                Some(a) => {
                    a.builds.push(r.build);
                    a.needed.extend(r.needed);
                }
            }
        }
        all.ok_or_else(|| EngineError::NotFound(format!("no builder `{builder}` in the plan")))
    })
    .await
    .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))?
    .map_err(|e| match e {
        // A branch or revision the repository does not have is a missing thing, like a
        // missing builder.
        EngineError::BadRequest(m) if m.starts_with("cannot resolve") => ApiError::not_found(m),
        other => other.into(),
    })?;
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
    ListQuery::parse_typed(&pairs, &fields, &[]).map_err(ApiError::bad_request)
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

async fn stop(State(app): State<App>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "build")?;
    app.engine.stop(id, "stopped through the API")?;
    Ok(StatusCode::ACCEPTED)
}

async fn workers(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<serde_json::Value>> {
    list("workers", e.workers(), q, &[])
}

async fn repositories(State(app): State<App>) -> Json<serde_json::Value> {
    let mut repos = app.sources.map(|s| s.health()).unwrap_or_default();
    // A fetch error may name the master's mirror directory: the UI shows it to anyone.
    for r in &mut repos {
        r.error = r.error.as_deref().map(hide_paths);
    }
    Json(serde_json::json!({ "repositories": repos, "meta": { "total": repos.len() } }))
}

const STATUS_QUERY: &[(&str, &str)] = &[
    ("repo", "Only this repository's statuses"),
    ("commit", "Only this commit's (full id)"),
    ("state", "Only statuses in this build state: pending, running, success, failure, error, cancelled"),
    ("delivery", "Only statuses in this delivery state: queued, sent, retrying, given_up, superseded"),
    ("limit", "At most this many (default 50, at most 500)"),
    ("offset", "Skip this many matching statuses"),
];

/// The status outbox's rows, read through its indexes (a page costs what it shows, bounded
/// by the outbox's scan limit).
async fn statuses(State(e): State<Arc<Engine>>, q: Pairs) -> ApiResult<Json<crate::forge::outbox_store::StatusList>> {
    use crate::forge::outbox_store::{self as ob, DeliveryState, Filter};
    let Query(pairs) = q.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let mut f = Filter { limit: 50, ..Filter::default() };
    let number = |k: &str, v: &str, max: usize| -> ApiResult<usize> {
        v.parse::<usize>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| ApiError::bad_request(format!("`{k}` must be a number from 0 to {max}, not `{v}`")))
    };
    for (k, v) in pairs {
        match k.as_str() {
            "repo" => f.repo = Some(v),
            "commit" => f.commit = Some(v),
            "state" => {
                f.state = Some(serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                    ApiError::bad_request(format!(
                        "`state` is pending, running, success, failure, error or cancelled, not `{v}`"
                    ))
                })?)
            }
            "delivery" => {
                f.delivery = Some(DeliveryState::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`delivery` is queued, sent, retrying, given_up or superseded, not `{v}`"
                    ))
                })?)
            }
            "limit" => f.limit = number(&k, &v, 500)?,
            "offset" => f.offset = number(&k, &v, ob::MAX_SCAN)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{other}`: use repo, commit, state, delivery, limit or offset"
                )));
            }
        }
    }
    let (offset, limit) = (f.offset, f.limit);
    let page = tokio::task::spawn_blocking(move || ob::list(e.database(), &f))
        .await
        .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal".into(), "internal error".into()))?
        .map_err(|err| {
            tracing::error!(error = %err, "cannot list commit statuses");
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal".into(),
                "internal error; see the master's log".into(),
            )
        })?;
    let statuses = page
        .rows
        .iter()
        .map(|s| {
            let mut v = ob::CommitStatus::of(s);
            v.last_error = v.last_error.map(|m| hide_paths(&m));
            v
        })
        .collect();
    Ok(Json(ob::StatusList {
        statuses,
        meta: ob::StatusListMeta { offset, limit, more: page.more, truncated: page.truncated },
    }))
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

/// `GET /api/v2/logs/{id}/streams?offset=&limit=`: the stream runs overlapping bytes
/// `[offset, offset + limit)` (to the end without `limit`), each `{offset, stream}` and
/// lasting until the next; the first may start before `offset`. Only the sidecar records of
/// that range are read, so a page of a huge log costs its own runs.
async fn log_streams(
    State(e): State<Arc<Engine>>,
    Path(id): Path<String>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    if q.offset.max(q.limit).is_some_and(|n| n > crate::query::MAX_OFFSET) {
        return Err(ApiError::bad_request(format!("offset and limit may be at most {}", crate::query::MAX_OFFSET)));
    }
    let id = parse_id(&id, "log")?;
    let from = q.offset.unwrap_or(0);
    let to = q.limit.map_or(u64::MAX, |l| from.saturating_add(l));
    let (rec, runs) =
        blocking(move || e.log_runs(id, from, to)).await?.ok_or_else(|| ApiError::not_found(format!("no log {id}")))?;
    let runs: Vec<serde_json::Value> =
        runs.iter().map(|r| serde_json::json!({ "offset": r.offset, "stream": r.stream.name() })).collect();
    Ok(Json(serde_json::json!({ "id": rec.id, "bytes": rec.bytes, "runs": runs })))
}

#[derive(Deserialize)]
struct RangeQuery {
    offset: Option<u64>,
    limit: Option<u64>,
}

/// What a `Range` header asks of a representation of `len` bytes (RFC 9110, section 14).
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range: a unit other than bytes, a malformed or invalid spec (last before
    /// first), or several ranges. The whole representation answers (200).
    Whole,
    /// Bytes `[start, end)`, non-empty (206).
    Part(u64, u64),
    /// A valid range none of whose bytes exist (416).
    Unsatisfiable,
}

/// Reads one `Range` header value against a length, as RFC 9110 says: a first position at or
/// past the end and a zero suffix are unsatisfiable; what cannot be parsed is ignored.
pub fn range_ask(value: &str, len: u64) -> RangeAsk {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeAsk::Whole };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAsk::Whole };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    if a.is_empty() {
        let Some(n) = digits(b).then(|| b.parse::<u64>().ok()).flatten() else { return RangeAsk::Whole };
        if n == 0 || len == 0 {
            return RangeAsk::Unsatisfiable;
        }
        return RangeAsk::Part(len.saturating_sub(n), len);
    }
    let Some(first) = digits(a).then(|| a.parse::<u64>().ok()).flatten() else { return RangeAsk::Whole };
    let last = if b.is_empty() {
        None
    } else {
        match digits(b).then(|| b.parse::<u64>().ok()).flatten() {
            Some(l) if l >= first => Some(l),
            _ => return RangeAsk::Whole,
        }
    };
    if first >= len {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(first, last.map_or(len, |l| l.saturating_add(1).min(len)))
}

/// The log's bytes, whole or a range (`Range: bytes=a-b`, or `?offset=&limit=`), streamed
/// from the file: memory use does not depend on the log's size. A range answers 206 with a
/// `Content-Range`; `offset`/`limit` past the end answer an empty 200 (a live log may grow).
async fn log_raw(
    State(e): State<Arc<Engine>>,
    Path(id): Path<String>,
    q: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    if q.offset.max(q.limit).is_some_and(|n| n > crate::query::MAX_OFFSET) {
        return Err(ApiError::bad_request(format!("offset and limit may be at most {}", crate::query::MAX_OFFSET)));
    }
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
    let (from, end, partial) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(|v| range_ask(v, len))
    {
        Some(RangeAsk::Unsatisfiable) => {
            let mut resp = ApiError(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable".into(),
                format!("log {id} has {len} bytes; the range asks for none of them"),
            )
            .into_response();
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
        Some(RangeAsk::Part(a, b)) => (a, b, true),
        Some(RangeAsk::Whole) | None => {
            let from = q.offset.unwrap_or(0).min(len);
            let end = q.limit.map_or(len, |l| from.saturating_add(l).min(len));
            (from, end, end > from && (from, end) != (0, len))
        }
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(|_| {
        if rec.bytes > 0 {
            // Written, yet not here: another master wrote it into a state_dir this one does
            // not share.
            ApiError::not_found(format!(
                "log {id} ({} bytes) is not in this master's state_dir: masters on one state must share state_dir (docs/postgres.md)",
                rec.bytes
            ))
        } else {
            ApiError::not_found(format!("log {id} has no file yet"))
        }
    })?;
    file.seek(std::io::SeekFrom::Start(from)).await.map_err(EngineError::Io)?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(end - from), 256 * 1024);
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, end - from)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("x-rbb-log-size", len);
    if partial {
        resp = resp
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {from}-{}/{len}", end - 1));
    }
    Ok(resp.body(Body::from_stream(stream)).unwrap_or_default())
}

async fn rebuild(State(app): State<App>, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
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

/// `GET /api/v2/events`: build, step, log and worker events as Server-Sent Events, each with
/// an `id:`. A client reconnecting with `Last-Event-ID` gets the events it missed, or a
/// `reset` event (reload what you show) when they are no longer held; a client too slow for
/// the stream gets a `reset` too, never a silent gap.
async fn events(
    State(app): State<App>,
    headers: HeaderMap,
) -> axum::response::sse::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>
{
    use axum::response::sse::{Event as Sse, KeepAlive};
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
    let live = app.live.get_or_init(|| crate::live::Live::start(app.engine.clone())).clone();
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let resume = live.resume(last);
    let to_sse = |e: crate::live::Numbered| Sse::default().id(e.id).event(e.kind).data(e.data);
    let mut first: Vec<Sse> = Vec::new();
    if resume.reset {
        first.push(
            Sse::default().event("reset").data(r#"{"reason":"the events after Last-Event-ID are no longer held"}"#),
        );
    }
    first.extend(resume.replay.into_iter().map(to_sse));
    let live_stream = BroadcastStream::new(resume.live).map(move |r| match r {
        Ok(e) => to_sse(e),
        Err(BroadcastStreamRecvError::Lagged(n)) => Sse::default().event("reset").data(format!("{{\"missed\":{n}}}")),
    });
    let stream = tokio_stream::iter(first).chain(live_stream).map(Ok);
    axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::default())
}

fn cache_stats_of(e: &Engine) -> Result<api::CacheStats, EngineError> {
    let s = e.cache_stats()?;
    Ok(api::CacheStats {
        entries: s.entries,
        blobs: s.blobs,
        stored_bytes: s.stored_bytes,
        max_size: e.cache_limit(),
        builders: s
            .per_builder
            .into_iter()
            .map(|(builder, hits, misses)| api::CacheBuilderStats { builder, hits, misses })
            .collect(),
    })
}

async fn cache_stats(State(e): State<Arc<Engine>>) -> ApiResult<Json<api::CacheStats>> {
    Ok(Json(blocking(move || cache_stats_of(&e)).await?))
}

async fn cache_gc(State(app): State<App>) -> ApiResult<Json<api::CacheGc>> {
    let e = app.engine.clone();
    let gc = blocking(move || {
        let out = e.cache_gc()?;
        Ok(api::CacheGc {
            entries: out.entries,
            blobs: out.blobs.len() as u64,
            bytes: out.bytes,
            stats: cache_stats_of(&e)?,
        })
    })
    .await?;
    Ok(Json(gc))
}

async fn cache_reset(State(app): State<App>, Path(builder): Path<String>) -> ApiResult<Json<api::CacheReset>> {
    let e = app.engine.clone();
    let b = builder.clone();
    let epoch = blocking(move || e.cache_reset(&b)).await?;
    Ok(Json(api::CacheReset { builder, epoch }))
}

/// `GET /api/v2/whoami`: the caller's token name and role (`anonymous` without a token).
async fn whoami(State(app): State<App>, caller: Option<axum::Extension<crate::auth::Caller>>) -> Json<api::WhoAmI> {
    let anonymous = app.security.tokens.anonymous();
    let c = caller.map(|c| c.0).unwrap_or(crate::auth::Caller {
        name: "anonymous".into(),
        role: anonymous,
        authenticated: false,
    });
    Json(api::WhoAmI { name: c.name, role: c.role, authenticated: c.authenticated, anonymous })
}

const AUDIT_QUERY: &[(&str, &str)] = &[
    ("limit", "At most this many entries (default 50, at most 500)"),
    ("before", "Only entries older than this id (the previous page's `meta.next_before`)"),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

/// `GET /api/v2/audit`: a page of the audit log, newest first.
async fn audit_log(
    State(e): State<Arc<Engine>>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<api::AuditList>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))?;
    let limit = q.limit.unwrap_or(50);
    if limit > crate::audit::MAX_PAGE {
        return Err(ApiError::bad_request(format!("limit must be at most {}", crate::audit::MAX_PAGE)));
    }
    let page = blocking(move || crate::audit::list(e.database(), q.before, limit).map_err(EngineError::from)).await?;
    Ok(Json(page))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_errors_keep_urls_and_lose_server_paths() {
        assert_eq!(
            hide_paths("cannot fetch /srv/src/app into /var/lib/rbb/mirrors/app.git: connecting"),
            "cannot fetch <path> into <path>: connecting"
        );
        let remote =
            "cannot fetch http://127.0.0.1:9/down.git: fatal: unable to access 'http://127.0.0.1:9/down.git/':";
        assert_eq!(hide_paths(remote), remote);
        assert_eq!(hide_paths("open '/etc/rbb/token' failed"), "open '<path>' failed");
    }

    #[test]
    fn ranges_read_as_rfc_9110_says() {
        assert_eq!(range_ask("bytes=328-", 328), RangeAsk::Unsatisfiable);
        assert_eq!(range_ask("bytes=-0", 328), RangeAsk::Unsatisfiable);
        assert_eq!(range_ask("bytes=-5", 0), RangeAsk::Unsatisfiable);
        assert_eq!(range_ask("bytes=99-0", 328), RangeAsk::Whole);
        assert_eq!(range_ask("bytes=0-1, 5-6", 328), RangeAsk::Whole);
        assert_eq!(range_ask("items=0-1", 328), RangeAsk::Whole);
        assert_eq!(range_ask("bytes=+1-2", 328), RangeAsk::Whole);
        assert_eq!(range_ask("bytes=327-", 328), RangeAsk::Part(327, 328));
        assert_eq!(range_ask("bytes=-1000", 328), RangeAsk::Part(0, 328));
        assert_eq!(range_ask("bytes=10-10", 328), RangeAsk::Part(10, 11));
        assert_eq!(range_ask("bytes=10-5000", 328), RangeAsk::Part(10, 328));
    }

    #[test]
    fn messages_name_no_server_path() {
        assert_eq!(
            scrub("cannot open `/srv/rbb/state/repos/app.git` (see /var/log/x): no"),
            "cannot open `<path>` (see <path>): no"
        );
        assert_eq!(scrub("no builder `app/test` at /api/v2/builders"), "no builder `app/test` at /api/v2/builders");
    }
}
