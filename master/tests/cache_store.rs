//! The step cache's store from the outside: the blob calls against the real gRPC service
//! (in process, on a loopback port, with a real tonic client authenticated as a worker),
//! stats, collection and resets through the real router, and `rbb cache` against a real
//! master process. Real redb in a temp dir, real blob files.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rbb_master::cache::{CacheEntry, OutputFile};
use rbb_master::engine::Engine;
use rbb_master::server::{MasterOptions, open};
use rbb_master::store::{Batch, Sync};
use rbb_schema::proto::worker_client::WorkerClient;
use rbb_schema::proto::worker_server::WorkerServer;
use rbb_schema::proto::{BlobData, BlobList, BlobRef, BlobStored};
use sha2::Digest;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tower::ServiceExt;

const T: Duration = Duration::from_secs(30);
const PIPELINE: &str = "builders:\n  build:\n    steps: [{ name: compile, run: make }]\n";

struct Fixture {
    dir: tempfile::TempDir,
    engine: Arc<Engine>,
    router: axum::Router,
    grpc: String,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn tmp_files(&self) -> usize {
        std::fs::read_dir(self.state().join("cache/tmp")).expect("tmp dir").count()
    }

    fn client(&self) -> WorkerClient<Channel> {
        self.rt.block_on(WorkerClient::connect(format!("http://{}", self.grpc))).expect("connect")
    }
}

fn config(extra: &str) -> String {
    format!(
        "repositories:\n  - url: app\n    poll_interval: 1h\nworkers:\n  - name: w1\n    token: t\napi_token: tok\n{extra}"
    )
}

fn fixture(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), PIPELINE, &[]);
    std::fs::write(dir.path().join("rbb.yaml"), config(extra)).expect("config");
    let m = open(&options(dir.path())).expect("master");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let grpc = listener.local_addr().expect("addr").to_string();
    let svc = WorkerServer::new(rbb_master::grpc::WorkerService::new(m.engine.clone()));
    rt.spawn(
        tonic::transport::Server::builder().add_service(svc).serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let router = rbb_master::http::router_with(m.engine.clone(), Some(m.sources.clone()), m.api_token.clone());
    Fixture { dir, engine: m.engine, router, grpc, rt }
}

fn options(dir: &std::path::Path) -> MasterOptions {
    MasterOptions {
        config: dir.join("rbb.yaml"),
        state_dir: Some(dir.join("state")),
        http: "127.0.0.1:0".parse().expect("addr"),
        grpc: "127.0.0.1:0".parse().expect("addr"),
        heartbeat: Duration::from_secs(3600),
        migrate: false,
        standby: false,
    }
}

/// A request as worker `w1` makes it (or with another name and token).
fn as_worker<T>(msg: T, name: &str, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    md.insert("rbb-protocol", rbb_schema::proto::PROTOCOL_VERSION.parse().expect("header"));
    md.insert("rbb-worker", name.parse().expect("header"));
    md.insert("authorization", format!("Bearer {token}").parse().expect("header"));
    req
}

fn w1<T>(msg: T) -> tonic::Request<T> {
    as_worker(msg, "w1", "t")
}

fn digest_of(data: &[u8]) -> String {
    let h = sha2::Sha256::digest(data);
    format!("sha256:{}", h.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Bytes that do not compress: a chain of SHA-256 blocks.
fn noise(n: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut block = sha2::Sha256::digest([seed]);
    while out.len() < n {
        out.extend_from_slice(&block);
        block = sha2::Sha256::digest(block);
    }
    out.truncate(n);
    out
}

/// The upload's messages: the first names the blob, each carries at most 1 MiB.
fn pieces(digest: &str, data: &[u8]) -> Vec<BlobData> {
    let mut out: Vec<BlobData> =
        data.chunks(1 << 20).map(|c| BlobData { digest: String::new(), size: 0, data: c.to_vec() }).collect();
    if out.is_empty() {
        out.push(BlobData::default());
    }
    out[0].digest = digest.to_owned();
    out[0].size = data.len() as u64;
    out
}

async fn put(c: &mut WorkerClient<Channel>, digest: &str, data: &[u8]) -> Result<BlobStored, tonic::Status> {
    c.put_blob(w1(tokio_stream::iter(pieces(digest, data)))).await.map(|r| r.into_inner())
}

async fn get(c: &mut WorkerClient<Channel>, digest: &str) -> Result<Vec<BlobData>, tonic::Status> {
    let mut s = c.get_blob(w1(BlobRef { digest: digest.to_owned() })).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

async fn missing(c: &mut WorkerClient<Channel>, digests: &[&str]) -> Vec<String> {
    let list = BlobList { digests: digests.iter().map(|d| d.to_string()).collect() };
    c.missing_blobs(w1(list)).await.expect("missing blobs").into_inner().digests
}

/// Polls `f` on the runtime until it holds, failing after `T`.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_blob_put_is_read_back_whole_and_then_not_missing() {
    let f = fixture("");
    let mut c = f.client();
    f.rt.block_on(async {
        let big = noise((3 << 20) + 1, 1);
        let (d, empty) = (digest_of(&big), digest_of(b""));
        let other = digest_of(b"never uploaded");
        assert_eq!(missing(&mut c, &[&d, &other, &d, &empty]).await, vec![d.clone(), other.clone(), empty.clone()]);
        let stored = put(&mut c, &d, &big).await.expect("put");
        let on_disk = std::fs::metadata(f.engine.blobs().path(&d).expect("path")).expect("blob file").len();
        assert_eq!(stored.stored_bytes, on_disk);
        assert_eq!(f.engine.store().cache_blob(&d).expect("row"), Some((on_disk, 0)), "a row with no reference yet");
        put(&mut c, &empty, b"").await.expect("put the empty blob");
        assert_eq!(missing(&mut c, &[&d, &other, &empty]).await, vec![other.clone()]);
        let got = get(&mut c, &d).await.expect("get");
        assert_eq!(got.len(), 4, "1 MiB pieces");
        assert!(got.iter().all(|m| m.data.len() <= 1 << 20));
        assert_eq!((got[0].digest.as_str(), got[0].size), (d.as_str(), big.len() as u64));
        assert_eq!(got.iter().flat_map(|m| m.data.iter().copied()).collect::<Vec<u8>>(), big);
        let got = get(&mut c, &empty).await.expect("get the empty blob");
        assert!(got.iter().all(|m| m.data.is_empty()) && got[0].digest == empty);
        // Uploading it again changes nothing.
        put(&mut c, &d, &big).await.expect("put again");
        let stats = f.engine.cache_stats().expect("stats");
        assert_eq!((stats.blobs, stats.entries), (2, 0));
        // Errors.
        assert_eq!(get(&mut c, &other).await.expect_err("unknown").code(), tonic::Code::NotFound);
        assert_eq!(get(&mut c, "sha256:../x").await.expect_err("bad").code(), tonic::Code::InvalidArgument);
        // A file damaged on disk: DATA_LOSS at the end of the stream, and the file is gone,
        // so the blob is missing again and the next upload replaces it.
        let path = f.engine.blobs().path(&d).expect("path");
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, bytes).expect("damage");
        assert_eq!(get(&mut c, &d).await.expect_err("damaged").code(), tonic::Code::DataLoss);
        assert!(!path.exists());
        assert_eq!(missing(&mut c, &[&d]).await, vec![d.clone()]);
        put(&mut c, &d, &big).await.expect("put once more");
        assert_eq!(get(&mut c, &d).await.expect("get").iter().map(|m| m.data.len()).sum::<usize>(), big.len());
    });
    assert_eq!(f.tmp_files(), 0);
}

#[test]
fn an_upload_cut_short_wrong_or_too_big_leaves_nothing() {
    let f = fixture("cache:\n  max_size: 8m\n");
    let mut c = f.client();
    let data = noise(3 << 20, 2);
    let d = digest_of(&data);
    let nothing = |f: &Fixture| {
        assert!(!f.engine.blobs().has(&d), "no blob file");
        assert_eq!(f.engine.store().cache_blob(&d).expect("row"), None, "no blob row");
        assert_eq!(f.tmp_files(), 0, "no temporary file");
    };
    // The client drops the call mid-way.
    let (tx, rx) = tokio::sync::mpsc::channel::<BlobData>(4);
    let mut c2 = c.clone();
    let call = f.rt.spawn(async move { c2.put_blob(w1(ReceiverStream::new(rx))).await });
    f.rt.block_on(async {
        let mut first = pieces(&d, &data).remove(0);
        first.size = data.len() as u64;
        tx.send(first).await.expect("send");
        until("the upload's temporary file", || f.tmp_files() == 1).await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        until("the temporary file to go", || f.tmp_files() == 0).await;
    });
    drop(tx);
    nothing(&f);
    f.rt.block_on(async {
        // The stream ends before the declared size.
        let mut short = pieces(&d, &data);
        short.truncate(2);
        let err = c.put_blob(w1(tokio_stream::iter(short))).await.expect_err("short");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains("declared as 3145728 bytes but 2097152 arrived"), "{}", err.message());
        // The right size, other content.
        let mut wrong = data.clone();
        wrong[7] ^= 1;
        let err = c.put_blob(w1(tokio_stream::iter(pieces(&d, &wrong)))).await.expect_err("wrong");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        // More than declared.
        let mut long = pieces(&d, &data);
        long.push(BlobData { digest: String::new(), size: 0, data: vec![0; 10] });
        assert_eq!(
            c.put_blob(w1(tokio_stream::iter(long))).await.expect_err("long").code(),
            tonic::Code::InvalidArgument
        );
        // Larger than the whole cache.
        let mut huge = pieces(&d, &data);
        huge[0].size = 9 << 20;
        let err = c.put_blob(w1(tokio_stream::iter(huge))).await.expect_err("huge");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{}", err.message());
        // A stream that does not name a valid digest.
        let bad = vec![BlobData { digest: "sha256:abc".into(), size: 1, data: vec![1] }];
        assert_eq!(
            c.put_blob(w1(tokio_stream::iter(bad))).await.expect_err("bad").code(),
            tonic::Code::InvalidArgument
        );
    });
    nothing(&f);
    assert_eq!(f.engine.cache_stats().expect("stats").blobs, 0);
}

#[test]
fn blob_calls_refuse_a_wrong_token_or_an_unknown_worker() {
    let f = fixture("");
    let mut c = f.client();
    let d = digest_of(b"x");
    f.rt.block_on(async {
        for (name, token, code) in
            [("w1", "wrong", tonic::Code::Unauthenticated), ("nobody", "t", tonic::Code::PermissionDenied)]
        {
            let list = BlobList { digests: vec![d.clone()] };
            assert_eq!(c.missing_blobs(as_worker(list, name, token)).await.expect_err("refused").code(), code);
            let r = c.get_blob(as_worker(BlobRef { digest: d.clone() }, name, token)).await;
            assert_eq!(r.map(|_| ()).expect_err("refused").code(), code);
            let up = as_worker(tokio_stream::iter(pieces(&d, b"x")), name, token);
            assert_eq!(c.put_blob(up).await.expect_err("refused").code(), code);
        }
    });
    assert!(!f.engine.blobs().has(&d), "a refused upload stores nothing");
}

async fn call(f: &Fixture, method: &str, uri: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = f.router.clone().oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

/// Stores a blob of `data` (file and row) and an entry `key` using it, created at `at`.
fn stored_entry(e: &Engine, key: &str, data: &[u8], at: u64) -> (String, u64) {
    let d = digest_of(data);
    let mut w = e.blobs().writer(&d, data.len() as u64).expect("writer");
    w.write(data).expect("write");
    let stored = w.finish().expect("finish");
    e.store().cache_put_blob(&d, stored).expect("row");
    let entry = CacheEntry {
        key: key.to_owned(),
        builder: "app/build".into(),
        step: "compile".into(),
        build: 1,
        step_index: 0,
        log_id: None,
        files: vec![OutputFile {
            path: "out/bin".into(),
            mode: 0o755,
            digest: d.clone(),
            size: data.len() as u64,
            link: String::new(),
            dir: false,
        }],
        bytes: data.len() as u64,
        created_at: at,
    };
    e.store().commit(Batch { cache_entries: vec![&entry], ..Batch::default() }, Sync::Durable).expect("entry");
    (d, stored)
}

#[test]
fn stats_collection_and_resets_go_through_the_api_and_need_the_token_to_act() {
    let f = fixture("cache:\n  max_size: 40k\n");
    // Four entries of about 16 KiB each: 64 KiB against a 40 KiB limit. k1 was reused last.
    let blobs: Vec<(String, u64)> =
        (1..=4u8).map(|i| stored_entry(&f.engine, &format!("k{i}"), &noise(16 << 10, i), u64::from(i))).collect();
    let total: u64 = blobs.iter().map(|b| b.1).sum();
    let counts =
        Batch { cache_touches: vec![("k1", 100)], cache_counts: vec![("app/build", 3, 1)], ..Batch::default() };
    f.engine.store().commit(counts, Sync::Durable).expect("touch");
    f.rt.block_on(async {
        let (s, stats) = call(&f, "GET", "/api/v2/cache", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(stats["entries"], 4);
        assert_eq!(stats["blobs"], 4);
        assert_eq!(stats["stored_bytes"], total);
        assert_eq!(stats["max_size"], 40 << 10);
        assert_eq!(stats["builders"], serde_json::json!([{ "builder": "app/build", "hits": 3, "misses": 1 }]));
        for token in [None, Some("wrong")] {
            let (s, body) = call(&f, "POST", "/api/v2/cache/gc", token).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            assert_eq!(body["error"]["code"], "unauthorized");
            let (s, _) = call(&f, "POST", "/api/v2/builders/app%2Fbuild/cache/reset", token).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(f.engine.cache_stats().expect("stats").entries, 4, "a refused gc removes nothing");
        assert_eq!(f.engine.cache_epoch("app/build").expect("epoch"), 0, "a refused reset changes nothing");
        // Down to 90% of 40 KiB: the two least recently used (k2, k3) go; k1 was reused.
        let (s, gc) = call(&f, "POST", "/api/v2/cache/gc", Some("tok")).await;
        assert_eq!(s, StatusCode::OK, "{gc}");
        assert_eq!((gc["entries"].as_u64(), gc["blobs"].as_u64()), (Some(2), Some(2)), "{gc}");
        assert_eq!(gc["bytes"], blobs[1].1 + blobs[2].1);
        assert_eq!(gc["stats"]["entries"], 2);
        assert!(gc["stats"]["stored_bytes"].as_u64().expect("bytes") <= 36 << 10);
        for (i, (d, _)) in blobs.iter().enumerate() {
            let kept = i == 0 || i == 3;
            assert_eq!(f.engine.blobs().has(d), kept, "blob of k{}", i + 1);
            assert_eq!(f.engine.store().cache_entry(&format!("k{}", i + 1)).expect("read").is_some(), kept);
        }
        let (_, gc) = call(&f, "POST", "/api/v2/cache/gc", Some("tok")).await;
        assert_eq!(gc["entries"], 0, "under the limit: nothing more");
        // Resets.
        for want in [1, 2] {
            let (s, r) = call(&f, "POST", "/api/v2/builders/app%2Fbuild/cache/reset", Some("tok")).await;
            assert_eq!(s, StatusCode::OK, "{r}");
            assert_eq!(r, serde_json::json!({ "builder": "app/build", "epoch": want }));
        }
        assert_eq!(f.engine.cache_epoch("app/build").expect("epoch"), 2);
        let (s, r) = call(&f, "POST", "/api/v2/builders/app%2Fnope/cache/reset", Some("tok")).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(r["error"]["code"], "not_found");
    });
    // Everything survives a restart.
    let Fixture { dir, engine, rt, router, .. } = f;
    drop((engine, rt, router));
    let m = open(&options(dir.path())).expect("reopen");
    assert_eq!(m.engine.cache_epoch("app/build").expect("epoch"), 2);
    assert_eq!(m.engine.cache_stats().expect("stats").entries, 2);
    assert_eq!(m.engine.store().check_cache().expect("check"), None);
}

#[test]
fn a_bad_max_size_is_a_config_error_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), PIPELINE, &[]);
    std::fs::write(dir.path().join("rbb.yaml"), config("cache:\n  max_size: 10x\n")).expect("config");
    let err = open(&options(dir.path())).err().expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("cache.max_size: `10x` is not a size"), "{msg}");
}

#[test]
fn a_checkout_url_that_is_not_http_is_a_config_error_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), PIPELINE, &[]);
    std::fs::write(dir.path().join("rbb.yaml"), config("checkout_url: ci.internal:8010\n")).expect("config");
    let err = open(&options(dir.path())).err().expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("checkout_url: `ci.internal:8010` is not an http:// or https:// URL"), "{msg}");
}

#[test]
fn rbb_cache_stats_and_gc_talk_to_a_running_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_repo(&dir.path().join("app"), PIPELINE, &[]);
    std::fs::write(dir.path().join("rbb.yaml"), config("cache:\n  max_size: 2g\n")).expect("config");
    let m = Master::start(&dir.path().join("rbb.yaml"), &dir.path().join("state"));
    let url = format!("http://{}", m.http);
    let rbb =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_rbb")).args(args).output().expect("run rbb");
    let out = rbb(&["cache", "stats", "--master", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("entries  0\n") && text.contains("stored   0 B of 2.0 GiB (0%)"), "{text}");
    let out = rbb(&["cache", "gc", "--master", &url]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered 401"), "{err}");
    let out = rbb(&["cache", "gc", "--master", &url, "--token", "tok"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("removed 0 entries, 0 blobs, 0 B\n"), "{text}");
    let out = rbb(&["cache", "stats", "--master", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the master"));
}

#[test]
fn the_janitors_run_holds_the_cache_to_its_limit() {
    let f = fixture("cache:\n  max_size: 20k\n");
    let (old, _) = stored_entry(&f.engine, "old", &noise(16 << 10, 1), 1);
    let (new, _) = stored_entry(&f.engine, "new", &noise(16 << 10, 2), 2);
    let policy = rbb_master::engine::RetentionPolicy::default();
    let report = f.engine.retention(&policy, rbb_master::model::now_ms()).expect("janitor run");
    assert_eq!((report.cache.entries, report.cache.blobs), (1, vec![old.clone()]));
    assert!(!f.engine.blobs().has(&old) && f.engine.blobs().has(&new));
    // Under the limit: a run changes nothing.
    let report = f.engine.retention(&policy, rbb_master::model::now_ms()).expect("janitor run");
    assert!(report.cache.is_empty());
    assert_eq!(f.engine.store().check_cache().expect("check"), None);
}
