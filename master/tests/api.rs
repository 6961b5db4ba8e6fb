//! The REST API in process: the real router over a real engine (redb in a temp dir, a real
//! git repository), without sockets. Every endpoint, filter and error case.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rbb_master::server::{MasterOptions, open};
use std::time::Duration;
use support::*;
use tower::ServiceExt;

struct Api {
    _dir: tempfile::TempDir,
    router: axum::Router,
    engine: std::sync::Arc<rbb_master::engine::Engine>,
}

fn api() -> Api {
    api_with(
        "builders:\n  build:\n    tags: [fast]\n    steps: [{ name: compile, run: make }, { name: test, run: make test }]\n  lint:\n    steps: [{ run: make lint }]\n",
    )
}

fn api_with(pipeline: &str) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), pipeline, &[]);
    std::fs::write(
        dir.path().join("rbb.yaml"),
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    labels: [linux]\napi_token: tok\n",
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
    let m = open(&opts).expect("master");
    let router = rbb_master::http::router_with(m.engine.clone(), Some(m.sources.clone()), m.api_token.clone());
    Api { _dir: dir, router, engine: m.engine }
}

async fn call(
    api: &Api,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let headers: &[(&str, &str)] = if body.is_some() { &[("content-type", "application/json")] } else { &[] };
    call_with(api, method, uri, token, headers, body.map(|b| b.as_bytes().to_vec())).await
}

async fn call_with(
    api: &Api,
    method: &str,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body.map(Body::from).unwrap_or_else(Body::empty)).expect("request");
    let resp = api.router.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20).await.expect("body");
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(format!("not JSON: {}", String::from_utf8_lossy(&bytes))));
    (status, json)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[test]
fn the_openapi_document_matches_the_routes() {
    let a = api();
    rt().block_on(async {
        let (s, doc) = call(&a, "GET", "/api/v2/openapi.json", None, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(doc["openapi"], "3.1.0");
        let endpoints = rbb_master::http::endpoints();
        let paths = doc["paths"].as_object().expect("paths");
        assert_eq!(paths.len(), endpoints.iter().map(|e| e.path).collect::<std::collections::BTreeSet<_>>().len());
        for e in &endpoints {
            let op = &paths[e.path][e.method];
            assert!(op.is_object(), "{} {} is not documented", e.method, e.path);
            assert_eq!(op["summary"], e.summary);
            let public = e.access == Some(rbb_schema::config::Access::None);
            assert_eq!(op["security"] == serde_json::json!([]), public, "{}", e.path);
            // Every documented operation is routed (the fallback answers "no such endpoint").
            if e.path.ends_with("/events") {
                continue; // a stream; checked below
            }
            let uri = e.path.replace("{builder}", "app%2Fbuild").replace("{id}", "1").replace("{forge}", "github");
            if e.method == "post" && e.path.contains("cancel") {
                continue; // needs a pending request; covered below
            }
            let (_, body) = call(&a, &e.method.to_uppercase(), &uri, Some("tok"), None).await;
            assert_ne!(body["error"]["message"], "no such endpoint", "{} {uri} is not routed", e.method);
        }
        // What a generated client needs.
        assert_eq!(doc["servers"][0]["url"], "/");
        assert!(!doc.to_string().contains("\"nullable\""), "OpenAPI 3.1 has no `nullable`");
        let op = |m: &str, p: &str| doc["paths"][p][m].clone();
        let param = |o: &serde_json::Value, name: &str| {
            o["parameters"].as_array().expect("params").iter().find(|p| p["name"] == name).cloned().expect(name)
        };
        assert_eq!(param(&op("get", "/api/v2/builds/{id}"), "id")["schema"]["type"], "integer");
        assert_eq!(param(&op("get", "/api/v2/builds"), "limit")["schema"]["type"], "integer");
        assert_eq!(param(&op("get", "/api/v2/builds"), "offset")["schema"]["type"], "integer");
        assert_eq!(param(&op("get", "/api/v2/builds"), "id")["schema"]["type"], "number");
        assert_eq!(param(&op("get", "/api/v2/grid"), "limit")["schema"]["maximum"], 500);
        let raw = op("get", "/api/v2/logs/{id}/raw");
        assert_eq!(param(&raw, "Range")["in"], "header");
        for code in ["200", "206", "416"] {
            assert!(raw["responses"][code].is_object(), "raw log answers {code}");
        }
        assert!(op("get", "/api/v2/events")["responses"]["200"]["content"]["text/event-stream"].is_object());
        assert!(op("post", "/api/v2/builds/{id}/rebuild")["responses"]["201"].is_object());
        assert!(op("post", "/api/v2/builds/{id}/stop")["responses"]["202"].is_object());
        assert!(op("post", "/api/v2/builders/{builder}/force")["responses"]["401"].is_object());
        // Referenced schemas exist.
        for name in
            ["Build", "Builder", "Step", "Worker", "Change", "ForceRequest", "Forced", "ErrorBody", "Plan", "Rebuilt"]
        {
            assert!(doc["components"]["schemas"][name].is_object(), "schema {name} missing");
        }
    });
}

#[test]
fn lists_filter_order_and_page() {
    let a = api();
    rt().block_on(async {
        for b in ["app%2Fbuild", "app%2Flint", "app%2Fbuild"] {
            let (s, _) = call(&a, "POST", &format!("/api/v2/builders/{b}/force"), Some("tok"), Some("{}")).await;
            assert_eq!(s, StatusCode::CREATED);
        }
        let (_, all) = call(&a, "GET", "/api/v2/builds", None, None).await;
        assert_eq!(all["meta"]["total"], 3);
        let (_, r) = call(&a, "GET", "/api/v2/builds?builder=app%2Fbuild&order=id", None, None).await;
        let ids: Vec<u64> =
            r["builds"].as_array().expect("list").iter().map(|b| b["id"].as_u64().expect("id")).collect();
        assert_eq!(ids, [1, 3]);
        let (_, r) = call(&a, "GET", "/api/v2/builds?id__gt=1&order=-id", None, None).await;
        assert_eq!(r["builds"][0]["id"], 3);
        assert_eq!(r["meta"]["total"], 2);
        let (_, r) = call(&a, "GET", "/api/v2/builds?limit=1&offset=1&order=id", None, None).await;
        assert_eq!((r["builds"][0]["id"].clone(), r["meta"]["total"].clone()), (2.into(), 3.into()));
        let (_, r) = call(&a, "GET", "/api/v2/builds?builder__ne=app%2Fbuild", None, None).await;
        assert_eq!(r["meta"]["total"], 1);
        let (_, r) = call(&a, "GET", "/api/v2/builders?tags__contains=fast", None, None).await;
        assert_eq!(r["builders"][0]["id"], "app/build");
        assert_eq!(r["meta"]["total"], 1);
        let (_, r) = call(&a, "GET", "/api/v2/builds/1/steps?name__contains=tes", None, None).await;
        assert_eq!(r["steps"][0]["name"], "test");
        let (_, r) = call(&a, "GET", "/api/v2/workers?connected=false", None, None).await;
        assert_eq!(r["workers"][0]["name"], "w1");
        let (_, r) = call(&a, "GET", "/api/v2/builds?state=pending&submitted_at__le=99999999999999", None, None).await;
        assert_eq!(r["meta"]["total"], 3);

        for (uri, wanted) in [
            ("/api/v2/builds?resutl=SUCCESS", "did you mean `result`"),
            ("/api/v2/builds?id__like=1", "unknown operator `like`"),
            ("/api/v2/builds?limit=100000", "limit may be at most 1000"),
            ("/api/v2/builds?limit=ten", "limit must be a number"),
            ("/api/v2/builds?order=-colour", "unknown field `colour`"),
            ("/api/v2/builds/abc", "is not a build id"),
            ("/api/v2/grid?limit=100000", "at most 500"),
        ] {
            let (s, body) = call(&a, "GET", uri, None, None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(body["error"]["code"], "bad_request", "{uri}");
            assert!(body["error"]["message"].as_str().expect("message").contains(wanted), "{uri}: {body}");
        }
        let (s, body) = call(&a, "GET", "/api/v2/nope", None, None).await;
        assert_eq!((s, body["error"]["code"].clone()), (StatusCode::NOT_FOUND, "not_found".into()));
        let (s, _) = call(&a, "GET", "/api/v2/builds/77", None, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (_, r) = call(&a, "GET", "/api/v2/buildrequests?builder=app%2Flint", None, None).await;
        assert_eq!(r["buildrequests"][0]["id"], 2);
        let (_, r) = call(&a, "GET", "/api/v2/builders/app%2Fbuild", None, None).await;
        assert_eq!(r["builder"]["steps"], serde_json::json!(["compile", "test"]));
        assert_eq!(r["builds"].as_array().expect("builds").len(), 2);
    });
}

#[test]
fn control_actions_need_the_token_and_change_nothing_without_it() {
    let a = api();
    rt().block_on(async {
        for token in [None, Some("wrong")] {
            let (s, body) = call(&a, "POST", "/api/v2/builders/app%2Fbuild/force", token, Some("{}")).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        assert!(a.engine.builds_of("app/build", 10).expect("builds").is_empty(), "a refused force created a build");
        let (s, r) = call(
            &a,
            "POST",
            "/api/v2/builders/app%2Fbuild/force",
            Some("tok"),
            Some(r#"{"reason": "because", "properties": {"k": "v"}}"#),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let id = r["build"].as_u64().expect("id");
        for path in [format!("/api/v2/builds/{id}/stop"), format!("/api/v2/builds/{id}/rebuild")] {
            let (s, _) = call(&a, "POST", &path, None, None).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        }
        assert_eq!(a.engine.build(id).expect("build").state, rbb_schema::api::State::Pending);
        let (s, _) = call(&a, "POST", &format!("/api/v2/builds/{id}/stop"), Some("tok"), None).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        assert_eq!(a.engine.build(id).expect("build").result, Some(rbb_schema::results::Outcome::Cancelled));
        let (s, r) = call(&a, "POST", &format!("/api/v2/builds/{id}/rebuild"), Some("tok"), None).await;
        assert_eq!(s, StatusCode::CREATED);
        let again = r["build"].as_u64().expect("id");
        assert_eq!(a.engine.build(again).expect("build").reason, format!("rebuild of build {id}"));
        // Cancelling a request: refused without the token, then done; twice is a conflict.
        let path = format!("/api/v2/buildrequests/{again}/cancel");
        assert_eq!(call(&a, "POST", &path, None, None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&a, "POST", &path, Some("tok"), None).await.0, StatusCode::ACCEPTED);
        assert_eq!(call(&a, "POST", &path, Some("tok"), None).await.0, StatusCode::CONFLICT);
        // Webhooks are not control actions: they carry their own signature.
        let (s, _) = call(&a, "POST", "/api/v2/hooks/github", None, Some("{}")).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "no GitHub secret is configured");
    });
}

#[test]
fn the_grid_is_one_request_and_events_stream_live() {
    let a = api();
    rt().block_on(async {
        let req = Request::builder().uri("/api/v2/events").body(Body::empty()).expect("request");
        let resp = a.router.clone().oneshot(req).await.expect("response");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut stream = resp.into_body().into_data_stream();
        let (_, r) = call(&a, "POST", "/api/v2/builders/app%2Flint/force", Some("tok"), Some("{}")).await;
        let id = r["build"].as_u64().expect("id");
        use futures::StreamExt;
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an event in time")
            .expect("frame")
            .expect("bytes");
        let text = String::from_utf8_lossy(&frame);
        assert!(text.contains("event: build") && text.contains(&format!("\"id\":{id}")), "{text}");

        let (s, g) = call(&a, "GET", "/api/v2/grid?limit=10", None, None).await;
        assert_eq!(s, StatusCode::OK);
        let commit = a.engine.build(id).expect("build").commit;
        assert_eq!(g["columns"][0]["commit"], commit.as_str());
        assert_eq!(g["cells"]["app/lint"][commit.as_str()]["build"], id);
        assert_eq!(g["cells"]["app/lint"][commit.as_str()]["state"], "pending");
        assert_eq!(g["builders"].as_array().expect("builders").len(), 2);
    });
}

#[test]
fn a_force_body_is_json_whatever_its_content_type() {
    let a = api();
    rt().block_on(async {
        // What `curl -d '{"branch": "main"}'` sends, as in the README.
        let form = [("content-type", "application/x-www-form-urlencoded")];
        let body = Some(br#"{"branch": "main", "reason": "from curl"}"#.to_vec());
        let (s, r) = call_with(&a, "POST", "/api/v2/builders/app%2Fbuild/force", Some("tok"), &form, body).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        let id = r["build"].as_u64().expect("id");
        assert_eq!(r["builds"], serde_json::json!([id]));
        assert_eq!(a.engine.build(id).expect("build").reason, "from curl");
        let (s, r) = call_with(&a, "POST", "/api/v2/builders/app%2Fbuild/force", Some("tok"), &[], None).await;
        assert_eq!(s, StatusCode::CREATED, "an empty body means defaults: {r}");
        let (s, r) = call_with(
            &a,
            "POST",
            "/api/v2/builders/app%2Fbuild/force",
            Some("tok"),
            &form,
            Some(b"branch=main".to_vec()),
        )
        .await;
        assert_eq!((s, r["error"]["code"].clone()), (StatusCode::BAD_REQUEST, "bad_request".into()), "{r}");
    });
}

#[test]
fn every_error_has_the_one_shape_and_no_server_path() {
    let a = api();
    rt().block_on(async {
        let big = vec![b' '; 3 << 20];
        type Case<'a> = (&'a str, &'a str, Option<Vec<u8>>, StatusCode, &'a str);
        let cases: Vec<Case> = vec![
            ("GET", "/api/v2/builders/app%2Fbuild/force", None, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ("DELETE", "/api/v2/builds", None, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            (
                "POST",
                "/api/v2/builders/app%2Fbuild/force",
                Some(big),
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
            ),
            ("GET", "/api/v2/grid?limit=abc", None, StatusCode::BAD_REQUEST, "bad_request"),
            ("GET", "/api/v2/logs/1/raw?offset=-3", None, StatusCode::BAD_REQUEST, "bad_request"),
            ("GET", "/api/v2/builds?id__gt=abc", None, StatusCode::BAD_REQUEST, "bad_request"),
            ("GET", "/api/v2/builds?state=pendnig", None, StatusCode::BAD_REQUEST, "bad_request"),
            ("GET", "/api/v2/builds?result=SUCESS", None, StatusCode::BAD_REQUEST, "bad_request"),
            ("GET", "/api/v2/workers?connected=maybe", None, StatusCode::BAD_REQUEST, "bad_request"),
        ];
        for (method, uri, body, status, code) in cases {
            let (s, r) = call_with(&a, method, uri, Some("tok"), &[], body).await;
            assert_eq!(s, status, "{method} {uri}: {r}");
            assert_eq!(r["error"]["code"], code, "{method} {uri}: {r}");
            assert!(!r["error"]["message"].as_str().expect("message").is_empty(), "{method} {uri}: {r}");
        }
        // Valid filters of each kind still work.
        for uri in ["/api/v2/builds?id__gt=0", "/api/v2/builds?state=pending", "/api/v2/builds?result=null"] {
            assert_eq!(call(&a, "GET", uri, None, None).await.0, StatusCode::OK, "{uri}");
        }
        // A bad branch or revision names no path on the server's disk.
        let root = a._dir.path().to_string_lossy().into_owned();
        for body in [r#"{"branch": "no-such-branch"}"#, r#"{"revision": "0123456789abcdef"}"#] {
            let (s, r) = call(&a, "POST", "/api/v2/builders/app%2Fbuild/force", Some("tok"), Some(body)).await;
            let text = r.to_string();
            assert!(s.is_client_error() || s == StatusCode::CREATED, "{body}: {s} {r}");
            assert!(!text.contains(&root) && !text.contains("/tmp"), "{body}: {r}");
            if s == StatusCode::CREATED {
                let b = a.engine.build(r["build"].as_u64().expect("id")).expect("build");
                let shown = serde_json::to_string(&b).expect("json");
                assert!(!shown.contains(&root), "{body}: the build shows a server path: {shown}");
            }
        }
    });
}

#[test]
fn a_matrix_builder_is_forced_by_its_base_name() {
    let a = api_with(
        "builders:\n  test:\n    matrix: { os: [linux, mac], py: ['3.11', '3.12'] }\n    steps: [{ run: make test }]\n  lint:\n    steps: [{ run: make lint }]\n",
    );
    rt().block_on(async {
        let (s, r) = call(&a, "POST", "/api/v2/builders/app%2Ftest/force", Some("tok"), Some("{}")).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        let ids: Vec<u64> = r["builds"].as_array().expect("builds").iter().map(|b| b.as_u64().expect("id")).collect();
        assert_eq!(ids.len(), 4, "{r}");
        let mut builders: Vec<String> = ids.iter().map(|i| a.engine.build(*i).expect("build").builder).collect();
        builders.sort();
        assert_eq!(
            builders,
            [
                "app/test[os=linux,py=3.11]",
                "app/test[os=linux,py=3.12]",
                "app/test[os=mac,py=3.11]",
                "app/test[os=mac,py=3.12]"
            ]
        );
        // One combination alone, and a name that is neither.
        let (s, r) =
            call(&a, "POST", "/api/v2/builders/app%2Ftest%5Bos%3Dmac%2Cpy%3D3.12%5D/force", Some("tok"), None).await;
        assert_eq!((s, r["builds"].as_array().map(Vec::len)), (StatusCode::CREATED, Some(1)), "{r}");
        let (s, r) = call(&a, "POST", "/api/v2/builders/app%2Ftset/force", Some("tok"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{r}");
        assert!(r["error"]["message"].as_str().expect("message").contains("app/test"), "{r}");
    });
}

/// Ranges as RFC 9110 reads them, on a real log written by a real worker; the master and
/// worker logs, written to files, carry no ANSI colours.
#[test]
fn log_ranges_follow_rfc_9110() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  out:\n    labels: [linux]\n    steps: [{ name: print, run: 'printf 0123456789' }]\n",
        &[],
    );
    let config = write_config(dir.path(), &["app"], &[("w1", "t1", &["linux"])]);
    let m = Master::start(&config, &dir.path().join("state"));
    let _w = Worker::start(&m, "w1", "t1", &dir.path().join("w1"), &[]);
    let id = m.force("app/out");
    let b = m.finished(id, Duration::from_secs(60));
    let log = b["steps"][0]["log_id"].as_u64().expect("log id");
    let uri = format!("/api/v2/logs/{log}/raw");
    let full = m.get(&uri).body;
    let n = full.len();
    assert!(n >= 10, "{}", String::from_utf8_lossy(&full));
    let ask = |range: &str| http(&m.http, "GET", &uri, &[("Range", range)], None);
    for range in [format!("bytes={n}-"), "bytes=-0".to_owned(), format!("bytes={}-{}", n + 5, n + 9)] {
        let r = ask(&range);
        assert_eq!(r.status, 416, "{range}: {}", r.text());
        assert_eq!(r.header("content-range"), Some(format!("bytes */{n}").as_str()), "{range}");
        assert_eq!(r.json()["error"]["code"], "range_not_satisfiable", "{range}");
    }
    // Invalid or several ranges are ignored: the whole log.
    for range in ["bytes=9-0", "bytes=0-1,4-5", "lines=1-2", "bytes=a-b"] {
        let r = ask(range);
        assert_eq!((r.status, r.header("content-range")), (200, None), "{range}");
        assert_eq!(r.body, full, "{range}");
    }
    let r = ask(&format!("bytes={}-", n - 1));
    assert_eq!(r.status, 206);
    assert_eq!(r.body, full[n - 1..]);
    assert_eq!(r.header("content-range"), Some(format!("bytes {}-{}/{n}", n - 1, n - 1).as_str()));
    let r = ask("bytes=-1000");
    assert_eq!((r.status, r.body.clone()), (206, full.clone()));
    let r = ask(&format!("bytes=2-{}", n + 100));
    assert_eq!(r.header("content-range"), Some(format!("bytes 2-{}/{n}", n - 1).as_str()));
    // `offset` at the end of a (possibly live) log: nothing yet, and no false Content-Range.
    let r = m.get(&format!("{uri}?offset={n}"));
    assert_eq!((r.status, r.body.len(), r.header("content-range")), (200, 0, None));
    let r = m.get(&format!("{uri}?offset=3&limit=2"));
    assert_eq!((r.status, r.body.clone()), (206, full[3..5].to_vec()));

    for (who, text) in [("master", m.log_text()), ("worker", _w.log_text())] {
        assert!(!text.is_empty(), "the {who} wrote no log");
        assert!(!text.contains('\u{1b}'), "the {who}'s log file carries ANSI escapes:\n{text}");
    }
}

/// Reads a Server-Sent Events body until `done` holds for the parsed events `(id, event,
/// data)`, under a hard timeout.
async fn sse_until(
    body: &mut (impl futures::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
    done: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    use futures::StreamExt;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events: Vec<(String, String, String)> = text
            .split("\n\n")
            .filter(|block| block.lines().any(|l| l.starts_with("event:")))
            .map(|block| {
                let field = |name: &str| {
                    block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default()
                };
                (field("id:"), field("event:"), field("data:"))
            })
            .collect();
        if done(&events) {
            return events;
        }
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("no such events in time; got:\n{text}"))
            .expect("stream ended")
            .expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[test]
fn events_have_ids_and_resume_after_last_event_id() {
    let a = api();
    rt().block_on(async {
        let open = |last: Option<String>| {
            let router = a.router.clone();
            async move {
                let mut req = Request::builder().uri("/api/v2/events");
                if let Some(l) = last {
                    req = req.header("last-event-id", l);
                }
                let resp = router.oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
                assert_eq!(resp.headers()["content-type"], "text/event-stream");
                resp.into_body().into_data_stream()
            }
        };
        let mut first = open(None).await;
        let (_, r) = call(&a, "POST", "/api/v2/builders/app%2Flint/force", Some("tok"), Some("{}")).await;
        let one = r["build"].as_u64().expect("id");
        let got =
            sse_until(&mut first, |e| e.iter().any(|(_, k, d)| k == "build" && d.contains(&format!("\"id\":{one}"))))
                .await;
        let (last_id, _, _) = got.last().expect("an event").clone();
        assert!(!last_id.is_empty(), "events carry ids: {got:?}");
        drop(first);

        // Missed while away: two more forces.
        let mut missed = Vec::new();
        for _ in 0..2 {
            let (_, r) = call(&a, "POST", "/api/v2/builders/app%2Fbuild/force", Some("tok"), Some("{}")).await;
            missed.push(r["build"].as_u64().expect("id"));
        }
        let mut again = open(Some(last_id.clone())).await;
        let got = sse_until(&mut again, |e| {
            missed.iter().all(|m| e.iter().any(|(_, k, d)| k == "build" && d.contains(&format!("\"id\":{m},"))))
        })
        .await;
        assert!(got.iter().all(|(id, k, _)| k != "reset" && !id.is_empty() && *id != last_id), "{got:?}");
        for pair in got.windows(2) {
            assert_ne!((&pair[0].1, &pair[0].2), (&pair[1].1, &pair[1].2), "consecutive duplicates: {got:?}");
        }
        let ids: Vec<u64> =
            got.iter().map(|(id, _, _)| id.rsplit('-').next().and_then(|n| n.parse().ok()).expect("n")).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

        // An id this master does not hold (another run's, or garbage): a reset first.
        for stale in ["1-5", "nonsense"] {
            let mut s = open(Some(stale.to_owned())).await;
            let got = sse_until(&mut s, |e| !e.is_empty()).await;
            assert_eq!(got[0].1, "reset", "{stale}: {got:?}");
        }
    });
}

/// `builder=` a matrix builder's base name lists the builds of every combination, by the
/// builder index, in id order with paging and a right total; an exact id keeps meaning one.
#[test]
fn a_matrix_builder_base_name_filters_every_combination() {
    let a = api_with(
        "builders:\n  test:\n    matrix: { os: [linux, mac] }\n    steps: [{ run: make test }]\n  test2:\n    steps: [{ run: make }]\n  lint:\n    steps: [{ run: make lint }]\n",
    );
    rt().block_on(async {
        let mut forced = Vec::new();
        for builder in ["app%2Ftest", "app%2Flint", "app%2Ftest%5Bos%3Dmac%5D", "app%2Ftest2", "app%2Ftest"] {
            let (s, r) = call(&a, "POST", &format!("/api/v2/builders/{builder}/force"), Some("tok"), None).await;
            assert_eq!(s, StatusCode::CREATED, "{r}");
            forced.push(
                r["builds"].as_array().expect("builds").iter().map(|b| b.as_u64().expect("id")).collect::<Vec<_>>(),
            );
        }
        // The combinations' builds: both of each base-name force, and the one of `os=mac`.
        let mut want: Vec<u64> = [&forced[0], &forced[2], &forced[4]].into_iter().flatten().copied().collect();
        want.sort_unstable_by(|x, y| y.cmp(x));
        assert_eq!(want.len(), 5);
        let ids = |r: &serde_json::Value| -> Vec<u64> {
            r["builds"].as_array().expect("builds").iter().map(|b| b["id"].as_u64().expect("id")).collect()
        };
        let (s, r) = call(&a, "GET", "/api/v2/builds?builder=app/test", None, None).await;
        assert_eq!(s, StatusCode::OK, "{r}");
        assert_eq!((ids(&r), r["meta"]["total"].as_u64()), (want.clone(), Some(5)), "{r}");
        for b in r["builds"].as_array().expect("builds") {
            assert!(b["builder"].as_str().expect("builder").starts_with("app/test[os="), "{b}");
        }
        // Pages, both orders; a page boundary between combinations.
        let (_, r) = call(&a, "GET", "/api/v2/builds?builder=app/test&limit=2&offset=1", None, None).await;
        assert_eq!((ids(&r), r["meta"]["total"].as_u64()), (want[1..3].to_vec(), Some(5)), "{r}");
        let (_, r) = call(&a, "GET", "/api/v2/builds?builder__eq=app/test&order=id&limit=3&offset=3", None, None).await;
        let oldest: Vec<u64> = want.iter().rev().copied().collect();
        assert_eq!((ids(&r), r["meta"]["total"].as_u64()), (oldest[3..].to_vec(), Some(5)), "{r}");
        // Another order sorts the combinations' builds.
        let (_, r) =
            call(&a, "GET", "/api/v2/builds?builder=app/test&order=-submitted_at,-id&limit=2", None, None).await;
        assert_eq!((ids(&r), r["meta"]["total"].as_u64()), (want[..2].to_vec(), Some(5)), "{r}");
        // With another filter the total counts what passes both.
        let mac = "app%2Ftest%5Bos%3Dmac%5D";
        let (_, r) =
            call(&a, "GET", "/api/v2/builds?builder=app/test&builder__ne=app/test[os=linux]&limit=1", None, None).await;
        assert_eq!(r["meta"]["total"].as_u64(), Some(3), "{r}");
        assert_eq!(r["builds"][0]["builder"], "app/test[os=mac]", "{r}");
        let (_, r) = call(&a, "GET", "/api/v2/builds?repo=app&builder=app/test&offset=4", None, None).await;
        assert_eq!((ids(&r), r["meta"]["total"].as_u64()), (want[4..].to_vec(), Some(5)), "{r}");
        // An exact id is one combination; a plain builder whose name starts alike is itself;
        // a name that is neither lists nothing.
        let (_, r) = call(&a, "GET", &format!("/api/v2/builds?builder={mac}"), None, None).await;
        assert_eq!(r["meta"]["total"].as_u64(), Some(3), "{r}");
        let (_, r) = call(&a, "GET", "/api/v2/builds?builder=app/test2", None, None).await;
        assert_eq!((ids(&r), r["meta"]["total"].as_u64()), (forced[3].clone(), Some(1)), "{r}");
        let (s, r) = call(&a, "GET", "/api/v2/builds?builder=app/tes", None, None).await;
        assert_eq!((s, r["meta"]["total"].as_u64()), (StatusCode::OK, Some(0)), "{r}");
    });
}

/// Which stream each byte came from, on a real log written by a real worker: runs overlapping
/// a page (a boundary inside a run gets the whole run's start), and a log written before
/// streams were kept (no sidecar) reads as all stdout.
#[test]
fn log_streams_tell_stderr_from_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(
        &dir.path().join("app"),
        "builders:\n  out:\n    labels: [linux]\n    steps: [{ name: print, run: 'echo to-stdout; echo to-stderr-0123456789 >&2' }]\n",
        &[],
    );
    let config = write_config(dir.path(), &["app"], &[("w1", "t1", &["linux"])]);
    let state = dir.path().join("state");
    let m = Master::start(&config, &state);
    let _w = Worker::start(&m, "w1", "t1", &dir.path().join("w1"), &[]);
    let id = m.force("app/out");
    let b = m.finished(id, Duration::from_secs(60));
    let log = b["steps"][0]["log_id"].as_u64().expect("log id");
    let full = m.get(&format!("/api/v2/logs/{log}/raw")).body;
    let text = String::from_utf8_lossy(&full).into_owned();
    let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("no `{needle}` in the log:\n{text}")) as u64;
    // (The header's command line holds both words too: the output lines start a line.)
    let (out, err) = (at("\nto-stdout\n") + 1, at("\nto-stderr-") + 1);
    let runs = |q: &str| {
        let r = m.get(&format!("/api/v2/logs/{log}/streams{q}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["bytes"].as_u64(), Some(full.len() as u64), "{j}");
        j["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .map(|r| (r["offset"].as_u64().expect("offset"), r["stream"].as_str().expect("stream").to_owned()))
            .collect::<Vec<_>>()
    };
    let stream_at = |runs: &[(u64, String)], byte: u64| {
        runs.iter().rev().find(|(o, _)| *o <= byte).map(|(_, s)| s.clone()).unwrap_or_default()
    };
    let all = runs("");
    assert_eq!(all[0].0, 0, "{all:?}");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 != w[1].1), "{all:?}");
    assert_eq!(stream_at(&all, out), "stdout", "{all:?}\n{text}");
    assert_eq!(stream_at(&all, err), "stderr", "{all:?}\n{text}");
    // The worker's own lines (the command it runs) are the header.
    assert_eq!(all[0].1, "header", "{all:?}\n{text}");
    // A page starting inside the stderr line gets one run, starting where that line's run does.
    let page = runs(&format!("?offset={}&limit=5", err + 3));
    assert_eq!(page.len(), 1, "{page:?}");
    assert_eq!(page[0].1, "stderr");
    assert!(page[0].0 <= err, "{page:?}");
    // A page ending at the stderr run's start does not hold it.
    let start = all.iter().find(|(_, s)| s == "stderr").expect("stderr run").0;
    assert!(runs(&format!("?offset=0&limit={start}")).iter().all(|(_, s)| s != "stderr"));
    // Errors in the one shape.
    assert_eq!(m.get("/api/v2/logs/999999/streams").status, 404);
    assert_eq!(m.get(&format!("/api/v2/logs/{log}/streams?offset=x")).status, 400);

    // The log as an older version left it: no sidecar, all stdout.
    let file = state.join("logs").join(format!("{:04}", log / 1000)).join(format!("{log}.streams"));
    std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert_eq!(runs(&format!("?offset={err}&limit=4")), vec![(0, "stdout".to_owned())]);
}
