//! Commit statuses: the state mapping, each forge's request shape (recorded in
//! testdata/forges/), and the redb outbox with its sender against a local HTTP server that
//! answers like the forges do (201, 401, 422, 500, a 10-second stall).

mod support;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rbb_master::forge::outbox_store::{Delivery, StateOutbox};
use rbb_master::forge::sender::{CurlTransport, Outbox, send_due};
use rbb_master::forge::status::{self, CommitState, StatusRow, StatusTarget, commit_state};
use rbb_master::model::BuildRecord;
use rbb_master::webhooks::Forge;
use rbb_schema::api::State;
use rbb_schema::results::Outcome;

const TOKEN: &str = "tok-3f9a-never-in-errors";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn recorded(forge: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../testdata/forges/{forge}-status.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).expect("recorded shape")).expect("json")
}

fn build(state: State, result: Option<Outcome>) -> BuildRecord {
    serde_json::from_value(serde_json::json!({
        "id": 7, "builder": "app/test", "repo": "app", "repo_url": "/srv/app", "branch": "main",
        "commit": SHA, "plan_hash": "sha256:x", "pipeline_blob": null, "reason": "push", "event": "push",
        "properties": {}, "priority": 0, "state": state, "result": result, "result_reason": "",
        "worker": null, "waits_for": [], "halted": false, "cancelled": false, "attempt": 1,
        "checked_out": false, "changes": [], "submitted_at": 0, "started_at": null, "finished_at": null,
        "steps": []
    }))
    .expect("a build record")
}

#[test]
fn every_build_state_maps_to_a_commit_state() {
    use CommitState::*;
    assert_eq!(commit_state(State::Pending, None), Pending);
    assert_eq!(commit_state(State::Running, None), Running);
    assert_eq!(commit_state(State::Finished, None), Error);
    let expected = [
        (Outcome::Success, Success),
        (Outcome::Warnings, Success),
        (Outcome::Failure, Failure),
        (Outcome::Skipped, Success),
        (Outcome::Exception, Error),
        (Outcome::Retry, Error),
        (Outcome::Cancelled, Cancelled),
        (Outcome::Cached, Success),
        (Outcome::NotAffected, Success),
    ];
    for (outcome, state) in expected {
        assert_eq!(commit_state(State::Finished, Some(outcome)), state, "{outcome:?}");
    }
    let rows = status::statuses_for(&build(State::Finished, Some(Outcome::Cached)), "http://rbb.test/");
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].context.as_str(), rows[0].state), ("app/test", Success));
    assert_eq!(rows[0].target_url, "http://rbb.test/#/builds/7");
}

fn target(forge: Forge, api: &str) -> StatusTarget {
    StatusTarget { forge, api: api.to_owned(), project: "org/app".to_owned(), token: "TOKEN".to_owned() }
}

#[test]
fn requests_match_the_recorded_shapes() {
    for (forge, name, state) in [
        (Forge::GitHub, "github", State::Running),
        (Forge::GitLab, "gitlab", State::Running),
        (Forge::Gitea, "gitea", State::Running),
    ] {
        let rec = recorded(name);
        let row = status::statuses_for(&build(state, None), "http://rbb.test")[0].clone();
        let req = status::request(&target(forge, "http://forge.test/api"), &row);
        let want = &rec["request"];
        assert_eq!(req.url, format!("http://forge.test/api{}", want["path"].as_str().expect("path")), "{name}");
        let body: serde_json::Value = serde_json::from_str(&req.body).expect("json body");
        assert_eq!(body, want["body"], "{name}");
        let headers: BTreeMap<String, String> =
            req.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        for (k, v) in want["headers"].as_object().expect("headers") {
            if k == "content-type" {
                continue; // set by the transport
            }
            assert_eq!(headers.get(k), v.as_str().map(str::to_owned).as_ref(), "{name}: header {k}");
        }
    }
    // Each forge's own spelling of the states.
    let spell = |forge, state, result| {
        let row = status::statuses_for(&build(state, result), "http://rbb.test")[0].clone();
        let req = status::request(&target(forge, "http://forge.test"), &row);
        serde_json::from_str::<serde_json::Value>(&req.body).expect("json")["state"].as_str().expect("state").to_owned()
    };
    assert_eq!(spell(Forge::GitLab, State::Finished, Some(Outcome::Failure)), "failed");
    assert_eq!(spell(Forge::GitLab, State::Finished, Some(Outcome::Cancelled)), "canceled");
    assert_eq!(spell(Forge::GitHub, State::Finished, Some(Outcome::Exception)), "error");
    assert_eq!(spell(Forge::Gitea, State::Finished, Some(Outcome::NotAffected)), "success");
    assert_eq!(
        status::verdict(Forge::GitLab, 400, &recorded("gitlab")["responses"]["400"].to_string()),
        status::Verdict::Delivered,
        "GitLab's same-state refusal means the status is there"
    );
}

/// One scripted answer: status, body, and how long to stall first.
#[derive(Clone)]
struct Reply(u16, String, Duration);

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: serde_json::Value,
}

/// A forge's status API on loopback: records every request; answers from a script per
/// path (201 with the recorded body when the script is empty).
struct FakeForge {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<HashMap<String, VecDeque<Reply>>>>,
    _rt: tokio::runtime::Runtime,
}

impl FakeForge {
    fn start(ok_body: serde_json::Value) -> FakeForge {
        use axum::body::Body;
        use axum::http::{Request, Response};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<HashMap<String, VecDeque<Reply>>>> = Arc::default();
        let (s, sc) = (seen.clone(), script.clone());
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let (seen, script, ok_body) = (s.clone(), sc.clone(), ok_body.clone());
            async move {
                let path = req.uri().path().to_owned();
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                let bytes = axum::body::to_bytes(req.into_body(), 1 << 20).await.expect("body");
                let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                seen.lock().expect("seen").push(Seen { path: path.clone(), headers, body });
                let reply = script.lock().expect("script").get_mut(&path).and_then(|q| q.pop_front());
                let Reply(code, text, stall) = reply.unwrap_or(Reply(201, ok_body.to_string(), Duration::ZERO));
                if !stall.is_zero() {
                    tokio::time::sleep(stall).await;
                }
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(text))
                    .expect("response")
            }
        });
        rt.spawn(async move { axum::serve(listener, app).await });
        FakeForge { addr, seen, script, _rt: rt }
    }

    fn api(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn push(&self, path: &str, reply: Reply) {
        self.script.lock().expect("script").entry(path.to_owned()).or_default().push_back(reply);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

fn row(repo: &str, sha: &str, context: &str, state: CommitState) -> StatusRow {
    StatusRow {
        id: 0,
        repo: repo.to_owned(),
        sha: sha.to_owned(),
        context: context.to_owned(),
        state,
        description: format!("{state:?}").to_ascii_lowercase(),
        target_url: "http://rbb.test/#/builds/1".to_owned(),
        build: 1,
    }
}

fn open_outbox(path: &Path) -> StateOutbox<Arc<rbb_master::store::kv::Db>> {
    StateOutbox::open(Arc::new(rbb_master::store::kv::Db::Redb(redb::Database::create(path).expect("db"))))
        .expect("outbox")
}

#[test]
fn statuses_arrive_in_order_latest_only_and_never_twice_across_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("state.redb");
    let forge = FakeForge::start(recorded("github")["responses"]["201"].clone());
    let targets = |repo: &str| {
        (repo == "app").then(|| StatusTarget { token: TOKEN.into(), ..target(Forge::GitHub, &forge.api()) })
    };
    {
        let outbox = open_outbox(&db);
        // Queued and running before the sender ran: only `running` is sent for ctx a.
        outbox.push(&[row("app", SHA, "app/a", CommitState::Pending)]).expect("push");
        outbox
            .push(&[row("app", SHA, "app/a", CommitState::Running), row("app", SHA, "app/b", CommitState::Pending)])
            .expect("push");
        // The master stops here (the database is closed with the rows undelivered).
    }
    let outbox = open_outbox(&db);
    let round = send_due(&outbox, &CurlTransport, &targets, 1_000, Duration::from_secs(5));
    assert_eq!(round.delivered.len(), 2, "{round:?}");
    let seen = forge.seen();
    let sent: Vec<(String, String)> = seen
        .iter()
        .map(|s| {
            (s.body["context"].as_str().unwrap_or("").to_owned(), s.body["state"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    assert_eq!(sent, vec![("app/a".into(), "pending".into()), ("app/b".into(), "pending".into())]);
    assert!(seen.iter().all(|s| s.path == format!("/repos/org/app/statuses/{SHA}")), "{seen:?}");
    assert_eq!(seen[0].headers.get("authorization").map(String::as_str), Some(format!("Bearer {TOKEN}").as_str()));
    let first = outbox.recent(10).expect("recent");
    assert_eq!(first.iter().filter(|s| s.delivery == Delivery::Superseded).count(), 1, "{first:?}");

    // Then success for a: sent after the earlier ones, and nothing is sent twice, also after
    // the outbox is opened again.
    outbox.push(&[row("app", SHA, "app/a", CommitState::Success)]).expect("push");
    drop(outbox);
    let outbox = open_outbox(&db);
    let round = send_due(&outbox, &CurlTransport, &targets, 2_000, Duration::from_secs(5));
    assert_eq!(round.delivered.len(), 1, "{round:?}");
    assert_eq!(send_due(&outbox, &CurlTransport, &targets, 3_000, Duration::from_secs(5)).delivered.len(), 0);
    let seen = forge.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].body["state"], "success");
}

#[test]
fn failures_back_off_refusals_give_up_and_tokens_stay_hidden() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outbox = open_outbox(&tmp.path().join("state.redb"));
    let gl = recorded("gitlab");
    let forge = FakeForge::start(gl["responses"]["201"].clone());
    let path = format!("/projects/org%2Fapp/statuses/{SHA}");
    forge.push(&path, Reply(500, "{\"message\":\"500 Internal Server Error\"}".into(), Duration::ZERO));
    forge.push(&path, Reply(401, format!("{{\"message\":\"401 Unauthorized {TOKEN}\"}}"), Duration::ZERO));
    let targets = |_: &str| Some(StatusTarget { token: TOKEN.into(), ..target(Forge::GitLab, &forge.api()) });
    let id = outbox.push(&[row("app", SHA, "app/a", CommitState::Running)]).expect("push")[0];

    let r1 = send_due(&outbox, &CurlTransport, &targets, 10_000, Duration::from_secs(5));
    assert_eq!(r1.retried.len(), 1, "500 is retried: {r1:?}");
    assert_eq!(outbox.get(id).expect("get").expect("row").retry_at, 11_000, "first retry after 1 s");
    assert!(
        send_due(&outbox, &CurlTransport, &targets, 10_500, Duration::from_secs(5)).retried.is_empty(),
        "not due yet"
    );
    let r2 = send_due(&outbox, &CurlTransport, &targets, 11_000, Duration::from_secs(5));
    assert_eq!(r2.retried.len(), 1, "401 is retried (a token can be fixed): {r2:?}");
    let stored = outbox.get(id).expect("get").expect("row");
    assert_eq!((stored.retry_at, stored.row.attempts), (13_000, 2), "the wait doubles");
    let error = stored.row.last_error.unwrap_or_default();
    assert!(error.contains("refused the token") && !error.contains(TOKEN), "{error}");
    let r3 = send_due(&outbox, &CurlTransport, &targets, 13_000, Duration::from_secs(5));
    assert_eq!(r3.delivered, vec![id]);
    assert_eq!(forge.seen().len(), 3);
    assert_eq!(forge.seen()[2].headers.get("private-token").map(String::as_str), Some(TOKEN));

    // 422 (GitHub: no such commit) is given up at once.
    let gh = FakeForge::start(recorded("github")["responses"]["201"].clone());
    gh.push(
        &format!("/repos/org/app/statuses/{SHA}"),
        Reply(422, recorded("github")["responses"]["422"].to_string(), Duration::ZERO),
    );
    let gh_targets = |_: &str| Some(StatusTarget { token: TOKEN.into(), ..target(Forge::GitHub, &gh.api()) });
    let id = outbox.push(&[row("app", SHA, "app/z", CommitState::Failure)]).expect("push")[0];
    let r = send_due(&outbox, &CurlTransport, &gh_targets, 20_000, Duration::from_secs(5));
    assert_eq!(r.given_up.len(), 1, "{r:?}");
    assert_eq!(outbox.get(id).expect("get").expect("row").delivery, Delivery::GivenUp);
    assert!(outbox.due(u64::MAX).is_empty());
}

#[test]
fn a_stalled_forge_times_out_without_holding_back_the_others() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outbox = open_outbox(&tmp.path().join("state.redb"));
    let slow = FakeForge::start(recorded("gitea")["responses"]["201"].clone());
    let fast = FakeForge::start(recorded("gitea")["responses"]["201"].clone());
    slow.push(&format!("/repos/org/app/statuses/{SHA}"), Reply(201, "{}".into(), Duration::from_secs(10)));
    let targets = |repo: &str| {
        let api = if repo == "slow" { slow.api() } else { fast.api() };
        Some(StatusTarget { token: TOKEN.into(), ..target(Forge::Gitea, &api) })
    };
    outbox
        .push(&[row("slow", SHA, "slow/a", CommitState::Pending), row("fast", SHA, "fast/a", CommitState::Pending)])
        .expect("push");
    let started = Instant::now();
    let round = send_due(&outbox, &CurlTransport, &targets, 1_000, Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(8), "the stall was cut short: {:?}", started.elapsed());
    assert_eq!(round.delivered.len(), 1, "{round:?}");
    assert_eq!(round.retried.len(), 1, "{round:?}");
    assert!(round.retried[0].1.contains("timed out"), "{round:?}");
    assert_eq!(fast.seen().len(), 1);
}

#[test]
fn status_targets_come_from_the_repository_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("tok"), format!("{TOKEN}\n")).expect("token file");
    let repo = |url: &str, status: &str| -> rbb_schema::config::RepositoryConfig {
        serde_yaml::from_str(&format!("url: {url}\nstatus: {status}\n")).expect("repository config")
    };
    let t = status::target_from_config(
        &repo("https://github.com/org/app.git", "{forge: github, token_file: tok}"),
        tmp.path(),
    )
    .expect("valid")
    .expect("a target");
    assert_eq!(
        (t.forge, t.api.as_str(), t.project.as_str(), t.token.as_str()),
        (Forge::GitHub, "https://api.github.com", "org/app", TOKEN)
    );
    assert!(!format!("{t:?}").contains(TOKEN));
    let t = status::target_from_config(
        &repo("git@gitlab.example.com:group/sub/app.git", "{forge: gitlab, token: x}"),
        tmp.path(),
    )
    .expect("valid")
    .expect("a target");
    assert_eq!((t.api.as_str(), t.project.as_str()), ("https://gitlab.example.com/api/v4", "group/sub/app"));
    let t = status::target_from_config(
        &repo("ssh://git@codeberg.org:22/me/app.git", "{forge: forgejo, token: x}"),
        tmp.path(),
    )
    .expect("valid")
    .expect("a target");
    assert_eq!((t.forge, t.api.as_str(), t.project.as_str()), (Forge::Gitea, "https://codeberg.org/api/v1", "me/app"));
    let err =
        status::target_from_config(&repo("https://github.com/org/app.git", "{forge: bitbucket, token: x}"), tmp.path())
            .expect_err("unknown forge");
    assert!(err.to_string().contains("bitbucket"), "{err}");
    assert!(
        status::target_from_config(&repo("https://github.com/org/app.git", "{forge: github}"), tmp.path()).is_err()
    );
}

#[test]
fn a_build_reports_pending_running_and_success_and_a_killed_master_loses_no_status() {
    let forge = FakeForge::start(recorded("github")["response"].clone());
    let dir = tempfile::tempdir().expect("tempdir");
    support::make_repo(&dir.path().join("app"), "builders:\n  b:\n    steps: [{ run: 'true' }]\n", &[]);
    let config = dir.path().join("rbb.yaml");
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: app\n    poll_interval: 1h\n    status: {{ forge: github, api: '{}', project: o/app, token: {TOKEN} }}\nworkers:\n  - name: w1\n    token: t\npublic_url: https://ci.example\n",
            forge.api()
        ),
    )
    .expect("config");
    let state = dir.path().join("state");
    let mut m = support::Master::start(&config, &state);
    let w = support::Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let id = m.force("app/b");
    let b = m.finished(id, Duration::from_secs(60));
    assert_eq!(b["result"], "SUCCESS");
    let sha = b["commit"].as_str().expect("commit").to_owned();
    let path = format!("/repos/o/app/statuses/{sha}");
    let states = || -> Vec<String> {
        forge
            .seen()
            .iter()
            .filter(|s| s.path == path)
            .map(|s| s.body["state"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    support::wait_for(Duration::from_secs(30), "the success status", || {
        (states().last().map(String::as_str) == Some("success")).then_some(())
    });
    let seen = states();
    assert!(seen.iter().all(|s| ["pending", "success"].contains(&s.as_str())), "{seen:?}");
    let last = forge.seen().into_iter().rfind(|s| s.path == path).expect("a status");
    assert_eq!(last.body["context"], "app/b");
    assert_eq!(last.body["target_url"], format!("https://ci.example/#/builds/{id}"));
    assert_eq!(last.headers.get("authorization").map(String::as_str), Some(format!("Bearer {TOKEN}").as_str()));
    // The forge is down: the next build's statuses wait in the outbox; the master is killed;
    // after a restart they are delivered, the final one last.
    for _ in 0..3 {
        forge.push(&path, Reply(500, "{}".into(), Duration::ZERO));
    }
    let before = forge.seen().len();
    let id2 = m.force("app/b");
    m.finished(id2, Duration::from_secs(60));
    m.kill();
    drop(w);
    let m2 = support::Master::start_on(&config, &state, &m.grpc);
    let _w = support::Worker::start(&m2, "w1", "t", &dir.path().join("w1"), &[]);
    support::wait_for(Duration::from_secs(60), "the second build's success status after the restart", || {
        let after: Vec<Seen> = forge.seen().into_iter().skip(before).filter(|s| s.path == path).collect();
        after
            .iter()
            .any(|s| {
                s.body["state"] == "success" && s.body["target_url"] == format!("https://ci.example/#/builds/{id2}")
            })
            .then_some(())
    });
}

/// `GET /api/v2/statuses` on a real master whose forge delivers one repository's statuses,
/// fails the next with 500, and refuses the other repository's token with 401.
#[test]
fn the_api_shows_each_status_delivery_sent_retrying_and_refused() {
    let forge = FakeForge::start(recorded("github")["response"].clone());
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["app", "lib"] {
        support::make_repo(&dir.path().join(name), "builders:\n  b:\n    steps: [{ run: 'true' }]\n", &[]);
    }
    let config = dir.path().join("rbb.yaml");
    let status =
        |project: &str| format!("{{ forge: github, api: '{}', project: {project}, token: {TOKEN} }}", forge.api());
    std::fs::write(
        &config,
        format!(
            "repositories:\n  - url: app\n    poll_interval: 1h\n    status: {}\n  - url: lib\n    poll_interval: 1h\n    status: {}\nworkers:\n  - name: w1\n    token: t\npublic_url: https://ci.example\n",
            status("o/app"),
            status("o/lib")
        ),
    )
    .expect("config");
    let m = support::Master::start(&config, &dir.path().join("state"));
    let _w = support::Worker::start(&m, "w1", "t", &dir.path().join("w1"), &[]);
    let list = |query: &str| -> serde_json::Value {
        let r = m.get(&format!("/api/v2/statuses?{query}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.text().contains(TOKEN), "a token in the listing: {}", r.text());
        r.json()
    };

    // Delivered: the success status of app's build shows as sent.
    let id = m.force("app/b");
    let sha = m.finished(id, Duration::from_secs(60))["commit"].as_str().expect("commit").to_owned();
    let sent = support::wait_for(Duration::from_secs(30), "app's success status sent", || {
        let page = list(&format!("repo=app&commit={sha}&delivery=sent"));
        page["statuses"].as_array()?.iter().find(|s| s["state"] == "success" && s["build"] == id).cloned()
    });
    assert_eq!(sent["context"], "app/b");
    assert_eq!(sent["forge_state"], "success");
    assert_eq!(sent["target_url"], format!("https://ci.example/#/builds/{id}"));
    assert_eq!((sent["attempts"].as_u64(), sent["next_try_at"].is_null()), (Some(0), true), "{sent}");
    assert!(sent["updated_at"].as_u64() >= sent["queued_at"].as_u64() && sent["queued_at"].as_u64() > Some(0));

    // The forge answers 500: the next build's latest status is retrying, with the error.
    let app_path = format!("/repos/o/app/statuses/{sha}");
    for _ in 0..40 {
        forge.push(&app_path, Reply(500, "{\"message\":\"upstream down\"}".into(), Duration::ZERO));
    }
    let id2 = m.force("app/b");
    m.finished(id2, Duration::from_secs(60));
    let retrying = support::wait_for(Duration::from_secs(30), "app's second build retrying", || {
        let page = list("repo=app&delivery=retrying");
        page["statuses"].as_array()?.iter().find(|s| s["build"] == id2 && s["state"] == "success").cloned()
    });
    let error = retrying["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("HTTP 500") && error.contains("upstream down"), "{retrying}");
    assert!(retrying["attempts"].as_u64() >= Some(1), "{retrying}");
    assert!(retrying["next_try_at"].as_u64() > retrying["queued_at"].as_u64(), "{retrying}");
    // The delivered one is still shown as sent, listed after the newer rows of the commit.
    let commit = list(&format!("commit={sha}"));
    let rows = commit["statuses"].as_array().expect("statuses");
    let ids: Vec<u64> = rows.iter().filter_map(|s| s["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    assert!(rows.iter().any(|s| s["build"] == id && s["delivery"] == "sent"), "{commit}");
    assert!(rows.iter().all(|s| s["repo"] == "app"), "{commit}");

    // The forge refuses lib's token (401): retrying with the refusal, the token hidden.
    let lib_head = support::git(&dir.path().join("lib"), &["rev-parse", "HEAD"]);
    let lib_sha = lib_head.trim();
    for _ in 0..40 {
        forge.push(
            &format!("/repos/o/lib/statuses/{lib_sha}"),
            Reply(401, format!("{{\"message\":\"Bad credentials {TOKEN}\"}}"), Duration::ZERO),
        );
    }
    let lid = m.force("lib/b");
    m.finished(lid, Duration::from_secs(60));
    let refused = support::wait_for(Duration::from_secs(30), "lib's refused status", || {
        let page = list("repo=lib");
        page["statuses"]
            .as_array()?
            .iter()
            .find(|s| s["build"] == lid && s["state"] == "success" && s["attempts"].as_u64() >= Some(1))
            .cloned()
    });
    assert_eq!(refused["delivery"], "retrying", "{refused}");
    let error = refused["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("refused the token (HTTP 401)") && error.contains("<hidden>"), "{refused}");

    // Paging and bad queries.
    let all = list("limit=500");
    let n = all["statuses"].as_array().map(Vec::len).unwrap_or(0);
    assert!(n >= 4 && all["meta"]["more"] == false, "{all}");
    let first = list("limit=1");
    let second = list("limit=1&offset=1");
    assert_eq!(first["meta"]["more"], true);
    assert_eq!(first["statuses"][0], all["statuses"][0]);
    assert_eq!(second["statuses"][0]["id"], all["statuses"][1]["id"]);
    for bad in ["delivery=lost", "state=green", "limit=9999", "colour=red"] {
        let r = m.get(&format!("/api/v2/statuses?{bad}"));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "bad_request", "{bad}");
    }
}

#[test]
fn delivery_errors_shown_by_the_api_hide_credentials() {
    use rbb_master::forge::outbox_store::hide_credentials;
    assert_eq!(
        hide_credentials("Failed to connect to https://bot:s3cr3t-pass@forge.test/api port 443"),
        "Failed to connect to https://<hidden>@forge.test/api port 443"
    );
    assert_eq!(hide_credentials("sent Authorization: Bearer ghp_abcdef123456"), "sent Authorization: Bearer <hidden>");
    assert_eq!(
        hide_credentials("the forge refused the token (HTTP 401): nope"),
        "the forge refused the token (HTTP 401): nope",
        "prose is left alone"
    );
}
