//! Tokens, roles, the audit log and rate limits, in process: the real router over a real
//! engine (redb in a temp dir, a real git repository). The role table test calls every
//! endpoint of the table with every role.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rbb_master::server::{MasterOptions, open};
use sha2::Digest;
use std::time::Duration;
use support::*;
use tower::ServiceExt;

const READER: &str = "reader-token";
const OPERATOR: &str = "operator-token";
const ROOT: &str = "root-token";

fn hash(token: &str) -> String {
    let d = sha2::Sha256::digest(token.as_bytes());
    format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

struct Api {
    _dir: tempfile::TempDir,
    router: axum::Router,
}

/// A master with a read, a control and an admin token, anonymous access `anonymous`, and
/// `extra` config.
fn api(anonymous: &str, extra: &str) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  build:\n    steps: [{ name: compile, run: make }]\n  lint:\n    steps: [{ run: make lint }]\n",
        &[],
    );
    let config = format!(
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    labels: [linux]\n\
         webhooks:\n  github_secret: hook-secret\n\
         anonymous: {anonymous}\n\
         tokens:\n  - {{ name: reader, role: read, hash: \"{}\" }}\n  - {{ name: operator, role: control, hash: \"{}\" }}\n  - {{ name: root, role: admin, hash: \"{}\" }}\n{extra}",
        hash(READER),
        hash(OPERATOR),
        hash(ROOT)
    );
    std::fs::write(dir.path().join("rbb.yaml"), config).expect("config");
    let opts = MasterOptions {
        config: dir.path().join("rbb.yaml"),
        state_dir: Some(dir.path().join("state")),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: "127.0.0.1:0".parse().expect("addr"),
        heartbeat: Duration::from_secs(1),
        migrate: false,
        standby: false,
    };
    let m = open(&opts).expect("master");
    let router = rbb_master::http::router_secured(m.engine.clone(), Some(m.sources.clone()), m.security.clone());
    Api { _dir: dir, router }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: serde_json::Value,
}

async fn call(api: &Api, method: &str, uri: &str, token: Option<&str>, body: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(body.map(|b| Body::from(b.to_owned())).unwrap_or_else(Body::empty)).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(30), api.router.clone().oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {uri}: no answer within 30 s"))
        .expect("response");
    let (parts, body) = resp.into_parts();
    let event_stream =
        parts.headers.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // An event stream never ends: its headers are the answer.
    let json = if event_stream {
        serde_json::Value::Null
    } else {
        let bytes = axum::body::to_bytes(body, 64 << 20).await.expect("body");
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    };
    Answer { status: parts.status, headers: parts.headers, json }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A concrete path for a table path: builder `app/build`, id 1, forge github.
fn concrete(path: &str) -> String {
    path.replace("{builder}", "app%2Fbuild").replace("{id}", "1").replace("{forge}", "github")
}

#[test]
fn every_endpoint_declares_a_role_and_answers_each_role_by_it() {
    use rbb_schema::config::Access;
    let endpoints = rbb_master::http::endpoints();
    let undeclared: Vec<String> =
        endpoints.iter().filter(|e| e.access.is_none()).map(|e| format!("{} {}", e.method, e.path)).collect();
    assert!(
        undeclared.is_empty(),
        "endpoints without a role (use .public(), .read(), .control() or .admin()): {undeclared:?}"
    );
    let callers = [
        (None, Access::None),
        (Some(READER), Access::Read),
        (Some(OPERATOR), Access::Control),
        (Some(ROOT), Access::Admin),
    ];
    rt().block_on(async {
        let api = api("none", "");
        let mut table = String::new();
        for e in &endpoints {
            let needs = e.access.expect("declared");
            let uri = concrete(e.path);
            let body = (e.method == "post").then_some("{}");
            for (token, role) in callers {
                let a = call(&api, &e.method.to_uppercase(), &uri, token, body).await;
                let refused = a.headers.get("x-rbb-needs").map(|v| v.to_str().expect("ascii").to_owned());
                table.push_str(&format!("{} {uri} as {}: {}\n", e.method, role.name(), a.status));
                if role >= needs {
                    assert_eq!(
                        refused,
                        None,
                        "{} {uri} as {}: refused ({}) {}",
                        e.method,
                        role.name(),
                        a.status,
                        a.json
                    );
                    assert!(a.status.as_u16() < 500, "{} {uri} as {}: {} {}", e.method, role.name(), a.status, a.json);
                } else {
                    assert_eq!(
                        refused.as_deref(),
                        Some(needs.name()),
                        "{} {uri} as {}: {}",
                        e.method,
                        role.name(),
                        a.json
                    );
                    let want = if token.is_none() { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
                    assert_eq!(a.status, want, "{} {uri} as {}", e.method, role.name());
                    let code = if token.is_none() { "unauthorized" } else { "forbidden" };
                    assert_eq!(a.json["error"]["code"], code, "{} {uri}: the one error shape", e.method);
                    assert!(a.json["error"]["message"].as_str().expect("message").contains(needs.name()));
                }
            }
        }
        // A wrong token is 401 everywhere a token is read, whatever the endpoint needs.
        let a = call(&api, "GET", "/api/v2/builds", Some("not-a-token"), None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{table}");
        assert_eq!(a.json["error"]["message"], "wrong API token");
        let a = call(&api, "GET", "/api/v2/openapi.json", None, None).await;
        let roles: Vec<(String, String)> = a.json["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(p, ops)| {
                ops.as_object()
                    .expect("ops")
                    .iter()
                    .map(move |(m, op)| (format!("{m} {p}"), op["x-rbb-role"].to_string()))
            })
            .collect();
        assert_eq!(roles.len(), endpoints.len());
        for (op, role) in &roles {
            let path_op = &a.json["paths"][op.split_once(' ').expect("op").1][op.split_once(' ').expect("op").0];
            if role == "\"none\"" {
                assert_eq!(path_op["security"], serde_json::json!([]), "{op}");
            } else if role == "\"read\"" {
                // The master's anonymous role may be `read`: a token is optional there.
                assert_eq!(path_op["security"], serde_json::json!([{ "bearer": [] }, {}]), "{op}");
            } else {
                assert_eq!(path_op["security"], serde_json::json!([{ "bearer": [] }]), "{op}");
                assert!(path_op["responses"]["401"].is_object() && path_op["responses"]["403"].is_object(), "{op}");
            }
        }
    });
}

#[test]
fn anonymous_read_opens_viewing_only() {
    rt().block_on(async {
        let api = api("read", "");
        assert_eq!(call(&api, "GET", "/api/v2/builds", None, None).await.status, StatusCode::OK);
        let a = call(&api, "POST", "/api/v2/builders/app%2Fbuild/force", None, Some("{}")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert!(a.headers.get("www-authenticate").is_some());
        let who = call(&api, "GET", "/api/v2/whoami", None, None).await;
        assert_eq!(
            who.json,
            serde_json::json!({ "name": "anonymous", "role": "read", "authenticated": false, "anonymous": "read" })
        );
        let who = call(&api, "GET", "/api/v2/whoami", Some(OPERATOR), None).await;
        assert_eq!(who.json["name"], "operator");
        assert_eq!(who.json["role"], "control");
        assert_eq!(who.json["authenticated"], true);
    });
}

#[test]
fn control_and_admin_actions_are_audited_newest_first() {
    rt().block_on(async {
        let api = api("none", "");
        let forced = call(&api, "POST", "/api/v2/builders/app%2Fbuild/force", Some(OPERATOR), Some("{}")).await;
        assert_eq!(forced.status, StatusCode::CREATED, "{}", forced.json);
        let build = forced.json["build"].as_u64().expect("build");
        let stopped = call(&api, "POST", &format!("/api/v2/builds/{build}/stop"), Some(OPERATOR), None).await;
        assert_eq!(stopped.status, StatusCode::ACCEPTED, "{}", stopped.json);
        let rebuilt = call(&api, "POST", &format!("/api/v2/builds/{build}/rebuild"), Some(ROOT), None).await;
        assert_eq!(rebuilt.status, StatusCode::CREATED, "{}", rebuilt.json);
        let gc = call(&api, "POST", "/api/v2/cache/gc", Some(ROOT), None).await;
        assert_eq!(gc.status, StatusCode::OK, "{}", gc.json);
        let refused = call(&api, "POST", "/api/v2/cache/gc", Some(OPERATOR), None).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        let missing = call(&api, "POST", "/api/v2/builds/999/stop", Some(OPERATOR), None).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        // Reading is not audited.
        call(&api, "GET", "/api/v2/builds", Some(ROOT), None).await;

        assert_eq!(call(&api, "GET", "/api/v2/audit", Some(READER), None).await.status, StatusCode::FORBIDDEN);
        let log = call(&api, "GET", "/api/v2/audit", Some(OPERATOR), None).await;
        assert_eq!(log.status, StatusCode::OK, "{}", log.json);
        let rows: Vec<(String, String, String, String, u64)> = log.json["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    e["who"].as_str().expect("who").to_owned(),
                    e["action"].as_str().expect("action").to_owned(),
                    e["target"].as_str().expect("target").to_owned(),
                    e["result"].as_str().expect("result").to_owned(),
                    e["status"].as_u64().expect("status"),
                )
            })
            .collect();
        let b = build.to_string();
        let s = |v: &str| v.to_owned();
        assert_eq!(
            rows,
            vec![
                (s("operator"), s("stop"), s("999"), s("failed"), 404),
                (s("operator"), s("cache_gc"), s(""), s("refused"), 403),
                (s("root"), s("cache_gc"), s(""), s("ok"), 200),
                (s("root"), s("rebuild"), b.clone(), s("ok"), 201),
                (s("operator"), s("stop"), b.clone(), s("ok"), 202),
                (s("operator"), s("force"), s("app/build"), s("ok"), 201),
            ]
        );
        assert_eq!(log.json["meta"]["total"], 6);
        for e in log.json["entries"].as_array().expect("entries") {
            assert!(e["at_ms"].as_u64().expect("at") > 1_600_000_000_000);
            assert_eq!(e["from"], "local");
        }
        let page = call(&api, "GET", "/api/v2/audit?limit=2", Some(ROOT), None).await;
        assert_eq!(page.json["entries"].as_array().expect("entries").len(), 2);
        let before = page.json["meta"]["next_before"].as_u64().expect("more");
        let next = call(&api, "GET", &format!("/api/v2/audit?limit=2&before={before}"), Some(ROOT), None).await;
        assert_eq!(next.json["entries"][0]["action"], "cache_gc");
        assert_eq!(next.json["entries"][0]["who"], "root");
        let empty = call(&api, "GET", "/api/v2/audit?limit=0", Some(ROOT), None).await;
        assert_eq!(empty.status, StatusCode::OK);
        assert_eq!(empty.json["entries"], serde_json::json!([]));
        let bad = call(&api, "GET", "/api/v2/audit?limit=501", Some(ROOT), None).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    });
}

#[test]
fn floods_of_control_actions_and_webhooks_get_429_with_retry_after() {
    rt().block_on(async {
        let api = api(
            "none",
            "rate_limits:\n  control: { per_second: 0.5, burst: 3 }\n  webhooks: { per_second: 0.5, burst: 2 }\n",
        );
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let a = call(&api, "POST", "/api/v2/builders/app%2Flint/force", Some(OPERATOR), Some("{}")).await;
            if a.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(a.headers["retry-after"], "2", "{}", a.json);
                assert_eq!(a.json["error"]["code"], "rate_limited");
            }
            statuses.push(a.status.as_u16());
        }
        assert_eq!(statuses, [201, 201, 201, 429, 429]);
        // Wrong tokens are limited per address (each refusal would be an audit record).
        let mut wrong = Vec::new();
        for _ in 0..4 {
            wrong.push(call(&api, "POST", "/api/v2/builds/1/stop", Some("guess"), None).await.status.as_u16());
        }
        assert_eq!(wrong, [401, 401, 401, 429]);
        // Buckets are per caller: another token still acts, reading is not limited.
        let other = call(&api, "POST", "/api/v2/builders/app%2Flint/force", Some(ROOT), Some("{}")).await;
        assert_eq!(other.status, StatusCode::CREATED);
        assert_eq!(call(&api, "GET", "/api/v2/builds", Some(OPERATOR), None).await.status, StatusCode::OK);
        let mut hooks = Vec::new();
        for _ in 0..4 {
            hooks.push(call(&api, "POST", "/api/v2/hooks/github", None, Some("{}")).await.status.as_u16());
        }
        assert_eq!(hooks, [401, 401, 429, 429], "unsigned deliveries are refused until the bucket is empty");
        let audit = call(&api, "GET", "/api/v2/audit", Some(ROOT), None).await;
        assert_eq!(audit.json["meta"]["total"], 7, "rate-limited requests are not audited: {}", audit.json);
    });
}

#[test]
fn bad_token_config_stops_the_master_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: make }]\n", &[]);
    std::fs::write(
        dir.path().join("rbb.yaml"),
        "repositories:\n  - url: app\ntokens:\n  - { name: ci, role: control, hash: \"plain-secret\" }\n",
    )
    .expect("config");
    let opts = MasterOptions {
        config: dir.path().join("rbb.yaml"),
        state_dir: Some(dir.path().join("state")),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: "127.0.0.1:0".parse().expect("addr"),
        heartbeat: Duration::from_secs(1),
        migrate: false,
        standby: false,
    };
    let err = open(&opts).err().expect("refused");
    let text = format!("{err:#}");
    assert!(text.contains("tokens[0] (`ci`): hash") && text.contains("rbb token new"), "{text}");
}

#[test]
fn rbb_token_new_prints_a_token_and_a_config_entry_that_accepts_it() {
    // The command of docs/security.md.
    let doc = std::fs::read_to_string(root().join("docs/security.md")).expect("docs/security.md");
    let line = doc.lines().find(|l| l.starts_with("rbb token new ")).expect("the doc's example");
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    assert_eq!(args, ["token", "new", "release-team", "--role", "control"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rbb")).args(&args).output().expect("rbb token new");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = text.lines().find_map(|l| l.strip_prefix("token: ")).expect("token line").to_owned();
    let entry: String = text.lines().skip_while(|l| !l.starts_with("  - name:")).map(|l| format!("{l}\n")).collect();
    assert!(entry.contains("role: control"), "{text}");
    assert_eq!(
        hash(&token),
        entry.lines().find_map(|l| l.trim().strip_prefix("hash: ")).expect("hash").trim_matches('"')
    );
    let cfg: rbb_schema::config::MasterConfig =
        serde_yaml::from_str(&format!("tokens:\n{entry}")).expect("the printed entry is config");
    let tokens = rbb_master::auth::Tokens::from_config(&cfg).expect("valid");
    assert_eq!(tokens.by_token(&token).expect("accepted").name, "release-team");
}
